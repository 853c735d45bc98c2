//! `tapir run`: one tunnel in the foreground. One datapath for every kind:
//! device (tun: IP packets | tap: Ethernet frames) x transport (UDP | TCP)
//! x forwarding (allowed IPs | the tap-mode switch, in `tapir-proto`).
//!
//! ```text
//!   TunnelConfig ─▶ resolve endpoints ─▶ bind UDP or TCP [::]:port ─▶ create tun/tap (transient)
//!                ─▶ MAC, bridge, MTU, addresses, up, routes ─▶ loop:
//!     wait: UDP: poll(device, socket), woken by a signal for control and timers;
//!           TCP: epoll(device, connections, control bell, timerfd)
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
//!
//! Threads: over UDP, one for the network side (with the timers) and one for
//! the device side, which reads the device only during bursts (`Turn`);
//! over TCP, or with `TAPIR_THREADS=1`, one for both. The control
//! socket, host-name look-ups and the look at the host (`host`: MTU,
//! addresses, bridge ports) have threads of their own. Every thread
//! sleeps until it has work (a packet, a request, a timer, a signal: see
//! [`bell`]); an idle tunnel wakes about once a second, for its timers
//! (the host's watcher waits for the kernel's word that a link or an
//! address changed).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, ToSocketAddrs, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tapir_proto::wg::keys::PublicKey;
use tapir_proto::wg::messages;
use tapir_proto::wg::session::{SealJob, SessionError};
use tapir_proto::wg::tunnel::{
    Decapsulated, Encapsulated, Layer, Opening, PeerConfig, Random, Received, Sealing, Target,
    Tunnel,
};
use tapir_sys::mmsg::{Batch, ConnectedSend, Local};
use tapir_sys::poll::{Deadline, FOREVER, PollSet};
use tapir_sys::{IfName, Mode, Netlink, TunDevice, TunOptions, offload};
use tapir_wire::vnet::{self, VnetHeader};

pub mod bell;
pub mod config;
mod connected;
pub mod control;
pub mod engine;
mod host;
pub mod ops;
pub mod reload;
pub mod saveconfig;
pub mod tcp;
pub mod uapi;
use bell::Bell;
use connected::Connected;
use tcp::TcpTransport;

/// Datagrams per system call.
const BATCH: usize = 64;
/// Bytes per batch slot: the largest UDP datagram, or a tun packet with the
/// WireGuard header before and padding and tag after.
const SLOT: usize = 65536 + 64;

use crate::config::{Table, Transport, TunnelConfig};
use crate::dev::DevError;
use crate::qemu::BridgeMarks;

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

/// The wall clock (handshake timestamps, the time of the last handshake)
/// reckoned from the monotonic time a packet loop reads anyway: one clock
/// read per wake-up, not two. The system's clock is read again once a
/// second, so a step of it shows within one.
struct WallClock {
    at: Instant,
    wall: Duration,
}

impl WallClock {
    fn new() -> Self {
        Self {
            at: Instant::now(),
            wall: wall(),
        }
    }

    /// The wall clock at `now` (a monotonic time read just before).
    fn at(&mut self, now: Instant) -> Duration {
        let since = now.saturating_duration_since(self.at);
        if since < Duration::from_secs(1) {
            return self.wall + since;
        }
        self.at = now;
        self.wall = wall();
        self.wall
    }
}

/// Resolves the peers' endpoints (once, at start).
pub fn peer_configs(config: &TunnelConfig) -> Result<Vec<PeerConfig>, DevError> {
    config
        .peers
        .iter()
        .map(|p| {
            let endpoint = match &p.endpoint {
                Some(e) => Some(
                    crate::uapi::scoped_endpoint(e)
                        .or_else(|| e.to_socket_addrs().ok().and_then(|mut it| it.next()))
                        .ok_or_else(|| {
                            DevError::Invalid(format!(
                                "{}:{}: Endpoint {e} does not resolve: check the host name, or give an address",
                                config.file.display(),
                                p.endpoint_line
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
                keepalive: p
                    .keepalive
                    .filter(|&k| k > 0)
                    .map(|k| Duration::from_secs(k.into())),
                rate: p.rate,
            })
        })
        .collect()
}

/// The peers whose endpoint is a host name, with it (looked up again
/// while they are unreachable).
pub(crate) fn host_names(config: &TunnelConfig) -> Vec<(PublicKey, String)> {
    config
        .peers
        .iter()
        .filter_map(|p| {
            let e = p.endpoint.as_ref()?;
            crate::uapi::scoped_endpoint(e)
                .is_none()
                .then(|| (p.public_key, e.clone()))
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
    now >= reresolve_at(last_handshake, wall_now, started, last_try, now)
}

/// When [`reresolve_due`] comes to say yes, as things stand (`wall_now`
/// and `now` the same moment by the two clocks).
pub fn reresolve_at(
    last_handshake: Option<Duration>,
    wall_now: Duration,
    started: Duration,
    last_try: Option<Instant>,
    now: Instant,
) -> Instant {
    let since = last_handshake.unwrap_or(started);
    let unreachable = now + (since + RERESOLVE_AFTER).saturating_sub(wall_now);
    last_try.map_or(unreachable, |t| unreachable.max(t + RERESOLVE_EVERY))
}

/// How a tunnel's messages travel.
enum Net {
    Udp(UdpSocket),
    Tcp(Box<TcpTransport>),
}

/// A bridge this tunnel created (remembered as tapir's: see
/// [`BridgeMarks`]); removed when dropped (on down, or when start fails
/// after creating it), after the tunnel's tap, if no other port is left on
/// it (a VM's tap put there meanwhile keeps it, until its `qemu-ifdown`).
struct CreatedBridge {
    index: u32,
    name: IfName,
    marks: BridgeMarks,
    /// The tunnel's own tap, not counted as a port left on it (a start
    /// that fails drops the bridge before the tap).
    tap: u32,
}

impl Drop for CreatedBridge {
    fn drop(&mut self) {
        let Ok(mut nl) = Netlink::open() else {
            return;
        };
        let ports: Vec<String> = nl
            .links()
            .unwrap_or_default()
            .into_iter()
            .filter(|l| l.master == Some(self.index) && l.index != self.tap)
            .map(|l| l.name)
            .collect();
        if !ports.is_empty() {
            eprintln!(
                "tapir: bridge {} kept: {} still on it (it goes with its last port: tapir qemu-ifdown)",
                self.name,
                ports.join(", ")
            );
            return;
        }
        match nl.del_link(self.index) {
            Ok(()) => self.marks.forget(self.name.as_str()),
            Err(e) => eprintln!("tapir: cannot remove bridge {}: {e}", self.name),
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
    port: u16,
    /// Peers whose endpoint is a host name, to look up again on reconnect.
    hostnames: Vec<(PublicKey, String)>,
    bridge: Option<CreatedBridge>,
    /// Rules, DNS and the down hooks, taken back around the device's going.
    applied: ops::Applied,
    /// SaveConfig: the file to write the peers back to on down.
    save_to: Option<std::path::PathBuf>,
    /// What it was started from (a reload compares against it).
    config: TunnelConfig,
}

/// The UDP socket's buffers, each way. With the kernel's default (208 KiB,
/// three or four coalesced 64 KiB datagrams) a receiver that falls behind
/// for a moment drops whole runs of segments: one TCP stream through a tapir
/// pair on the 2-core development machine, iperf3 8 s, three runs each:
/// 5.48, 6.13, 5.55 Gbit/s with 34,000-59,000 segments retransmitted (the
/// socket's receive buffer overflowing, `UdpRcvbufErrors`), against 6.32,
/// 6.23, 6.18 with none at 4 MiB (1 MiB: 678). wireguard-go asks for 7 MiB.
/// Memory is taken only while datagrams wait. The price: where tapir's CPU
/// is what limits a transfer, the transfer's TCP no longer loses segments
/// to slow itself, and fills the queues below it instead (the tun device's
/// ring, up to `tcp_limit_output_bytes` a flow): pings alongside it took
/// 0.75-0.95 ms on average (four runs, 10 ms apart) before, 1.5-2.5 ms
/// after, at 1 or 2 MiB as at 4.
const SOCKET_BUFFER: usize = 4 << 20;

/// `e`, said of tunnel `config`'s name and file (a port taken, say: which
/// tunnel of a file with several, and where to change it).
fn named(config: &TunnelConfig, e: DevError) -> DevError {
    DevError::Invalid(format!(
        "{} ({}): {}",
        config.name,
        config.file.display(),
        e.to_string().trim_end_matches("; nothing was changed")
    ))
}

fn bind_udp(port: u16) -> Result<UdpSocket, DevError> {
    udp_socket(port).map_err(|e| {
        DevError::Invalid(format!(
            "cannot listen on UDP port {port}: {e}{}",
            if e.kind() == io::ErrorKind::AddrInUse {
                " (another program uses it: choose another ListenPort)"
            } else if e.raw_os_error() == Some(libc::EAFNOSUPPORT) {
                " (the kernel runs without IPv6, ipv6.disable=1 on its command line: tapir's one socket for both families needs it; disable_ipv6 in sysctl is enough to keep IPv6 off)"
            } else {
                ""
            }
        ))
    })
}

/// Whether environment variable `var` turns something off (`off` or `0`:
/// to measure what it is worth, or to get round a kernel that misbehaves).
fn off(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "off" || v == "0")
}

/// The tunnel's UDP socket on `port` (0: any), both families, not blocking.
fn udp_socket(port: u16) -> io::Result<UdpSocket> {
    // One socket for both families, whatever net.ipv6.bindv6only says
    // (with it set, a plain [::] socket took IPv6 alone, and every IPv4
    // peer was refused).
    let socket = socket2::Socket::new(
        socket2::Domain::IPV6,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_only_v6(false)?;
    socket.bind(&std::net::SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    let socket = UdpSocket::from(socket);
    socket.set_nonblocking(true)?;
    // (Best effort: where neither the capability nor the system's limits
    // allow it, the socket keeps what it has.)
    tapir_sys::mmsg::set_buffer_sizes(socket.as_fd(), SOCKET_BUFFER);
    // (Each datagram's local address is asked for where the host has more
    // than one: see `Outbox::take_host`.)
    Ok(socket)
}

/// `wg set NAME listen-port P` on a running tunnel over UDP: a socket on
/// `port`, made as the first was (buffers, `mark`, GRO as `gro`), takes the
/// place of `old` under the same descriptor, which both packet threads use
/// from their next call on (the poll set must take it again). Received
/// datagrams still queued on the old socket are lost, as the kernel
/// module's are.
fn move_udp(old: &UdpSocket, port: u16, mark: u32, gro: bool) -> io::Result<u16> {
    let new = udp_socket(port)?;
    // Port 0: where the kernel put it.
    let port = new.local_addr()?.port();
    // As the old one asked (see `Outbox::take_host`).
    tapir_sys::mmsg::set_pktinfo(new.as_fd(), tapir_sys::mmsg::pktinfo(old.as_fd()));
    if mark != 0 {
        socket2::SockRef::from(&new).set_mark(mark)?;
    }
    if gro {
        tapir_sys::mmsg::enable_gro(new.as_fd());
    }
    tapir_sys::raw::replace(old.as_fd(), std::os::fd::OwnedFd::from(new))?;
    Ok(port)
}

fn bind_tcp(port: Option<u16>, seed: u64) -> Result<TcpTransport, DevError> {
    TcpTransport::new(port, SLOT - 64, seed).map_err(|e| {
        DevError::Invalid(format!(
            "cannot listen on TCP port {}: {e}{}",
            port.unwrap_or(0),
            if e.kind() == io::ErrorKind::AddrInUse {
                " (another program uses it: choose another ListenPort)"
            } else if e.raw_os_error() == Some(libc::EAFNOSUPPORT) {
                " (the kernel runs without IPv6, ipv6.disable=1 on its command line: tapir's one socket for both families needs it; disable_ipv6 in sysctl is enough to keep IPv6 off)"
            } else {
                ""
            }
        ))
    })
}

/// The MTU wg-quick gives a tunnel whose file names none: the largest of
/// the paths toward its peers' endpoints (a route's own MTU, or its
/// device's), else the default route's device's, else 1500; less 80 (an
/// IPv6 and a UDP header, and WireGuard's 32 bytes), and in tap mode 14
/// more (each frame's Ethernet header). `None` where nothing is known.
fn auto_mtu(nl: &mut Netlink, endpoints: &[IpAddr], mode: Mode) -> Option<u32> {
    let links = nl.links().ok()?;
    let dev_mtu = |oif: Option<u32>| {
        oif.and_then(|i| links.iter().find(|l| l.index == i))
            .map(|l| l.mtu)
    };
    let mut path = 0;
    for &ip in endpoints {
        if let Ok(Some(r)) = nl.route_to(ip) {
            if let Some(m) = r.mtu.or_else(|| dev_mtu(r.oif)) {
                path = path.max(m);
            }
        }
    }
    if path == 0 {
        path = nl
            .routes(None)
            .ok()?
            .iter()
            .filter(|r| r.dst.prefix_len() == 0 && r.dst.addr().is_ipv4() && r.table == 254)
            .find_map(|r| dev_mtu(r.oif))
            .unwrap_or(1500);
    }
    let overhead = match mode {
        Mode::Tun => 80,
        Mode::Tap => 80 + 14,
    };
    // (Not held at IPv6's 1280, as wg-quick does not: 576 at least.)
    Some(path.saturating_sub(overhead).max(576))
}

/// A tap tunnel's MAC when none is configured: made from its public key
/// and name, locally administered and unicast. The same at every start, so
/// that a restart does not leave the peers' neighbour caches pointing at a
/// MAC gone (a random one kept a restarted spoke unreachable by IP for the
/// 20-30 s those take to age), and another for each key and name.
fn tap_mac(public: &PublicKey, name: &IfName) -> [u8; 6] {
    local_mac(&[b"tapir tap MAC", &public.0, name.as_str().as_bytes()])
}

/// A locally administered, unicast MAC made from `parts` (a hash of them):
/// the same for the same parts, and as unlikely as a random one to meet
/// another.
pub(crate) fn local_mac(parts: &[&[u8]]) -> [u8; 6] {
    let h = tapir_proto::wg::crypto::hash(parts);
    let mut m = [0u8; 6];
    m.copy_from_slice(&h[..6]);
    m[0] = (m[0] & 0xfc) | 0x02;
    m
}

/// Says so when the tunnel's tap, of MTU `mtu`, is smaller than other
/// ports of bridge `bridge`: a bridge drops a frame too big for the port it
/// leaves by (it cannot fragment, nor tell the sender), so hosts behind
/// those ports that send full frames lose them, silently.
///
/// Looked at once a second while the tunnel runs (a VM's port comes
/// later): each port is named once (`warned`, by index and MTU).
fn bridge_mtu_note(
    nl: &mut Netlink,
    bridge: &IfName,
    tap: &str,
    mtu: u32,
    warned: &mut Vec<(u32, u32)>,
) {
    let Ok(links) = nl.links() else {
        return;
    };
    let Some(br) = links.iter().find(|l| l.name == bridge.as_str()) else {
        return;
    };
    let ports: Vec<&tapir_sys::Link> = links
        .iter()
        .filter(|l| l.master == Some(br.index) && l.name != tap && l.mtu > mtu)
        .collect();
    warned.retain(|w| ports.iter().any(|l| (l.index, l.mtu) == *w));
    let bigger: Vec<String> = ports
        .iter()
        .filter(|l| !warned.contains(&(l.index, l.mtu)))
        .map(|l| format!("{} ({})", l.name, l.mtu))
        .collect();
    for l in &ports {
        if !warned.contains(&(l.index, l.mtu)) {
            warned.push((l.index, l.mtu));
        }
    }
    if bigger.is_empty() {
        return;
    }
    eprintln!(
        "tapir: warning: the tunnel's tap has MTU {mtu}, less than the other ports of {bridge}: {}: frames over {mtu} bytes from them are dropped there, silently. Give the hosts on {bridge} MTU {mtu} (a guest: DHCP option 26, or virtio-net host_mtu={mtu}), or set MTU = {} here (the tunnel's datagrams then go out fragmented where the path is smaller)",
        bigger.join(", "),
        links
            .iter()
            .filter(|l| l.master == Some(br.index))
            .map(|l| l.mtu)
            .max()
            .unwrap_or(mtu),
    );
}

/// Puts the tap `index` on bridge `name`, creating the bridge (up) if it is
/// missing; returns the bridge if it is this tunnel's: created here, or by
/// an earlier run of it that crashed (remembered in `run_dir`).
fn join_bridge(
    nl: &mut Netlink,
    index: u32,
    name: &IfName,
    run_dir: &Path,
) -> Result<Option<CreatedBridge>, DevError> {
    let marks = BridgeMarks::open(run_dir)?;
    let (bridge_index, created) = match nl.link(name.as_str())? {
        Some(l) if l.kind.as_deref() == Some("bridge") && marks.has(name.as_str(), l.index) => (
            l.index,
            Some(CreatedBridge {
                index: l.index,
                name: name.clone(),
                marks,
                tap: index,
            }),
        ),
        Some(l) if l.kind.as_deref() == Some("bridge") => {
            // Not ours: nothing to remember.
            marks.tidy();
            (l.index, None)
        }
        Some(l) => {
            marks.tidy();
            return Err(DevError::Invalid(format!(
                "Bridge = {name}: {name} exists and is not a bridge (it is {}): choose another name",
                l.kind.as_deref().unwrap_or("a plain interface")
            )));
        }
        None => {
            let i = nl.add_bridge(name.as_str())?;
            let made = CreatedBridge {
                index: i,
                name: name.clone(),
                marks,
                tap: index,
            };
            made.marks.add(name.as_str(), i)?;
            (i, Some(made))
        }
    };
    if created.is_some() {
        nl.set_up(bridge_index, true)?;
    }
    nl.set_master(index, Some(bridge_index))?;
    Ok(created)
}

/// Creates a tunnel's device, not persistent: it, its addresses and its
/// routes go away with the descriptor, on any exit. With the virtio-net
/// header the kernel hands us TCP super-packets (TSO) and leaves checksums
/// to us: fewer reads, and no per-segment TCP work in the sender's kernel.
/// A tap takes the same offloads for the IP inside its frames.
fn create_device(
    nl: &mut Netlink,
    tun_path: &Path,
    name: &IfName,
    mode: Mode,
) -> Result<(TunDevice, u32), DevError> {
    let options = TunOptions {
        vnet_hdr: true,
        ..TunOptions::new(mode)
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
    Ok((dev, index))
}

/// Sets a tunnel up: resolves its peers, binds its port, creates and
/// configures its device. On failure nothing is left: the device is
/// transient and goes with its descriptor, and a bridge created here is removed.
pub fn start(config: &TunnelConfig, tun_path: &Path, run_dir: &Path) -> Result<Started, DevError> {
    let peers = peer_configs(config)?;
    if !crate::caps::has_net_admin() {
        return Err(DevError::Permission(crate::caps::net_admin_missing(
            "running a tunnel",
        )));
    }
    config::hooks_are_ours(config).map_err(DevError::Invalid)?;
    let name = &config.name;
    let mut nl = Netlink::open()?;
    if let Some(l) = nl.link(name.as_str())? {
        return Err(DevError::Invalid(if l.is_tun() {
            format!(
                "{name} already exists: another tunnel (or tun/tap device) has that name; take it down (tapir down {name}, or tapir dev del {name}) or rename {}",
                config.file.display()
            )
        } else {
            format!(
                "{name} already exists and is a {} link, not a tunnel's: name the tunnel otherwise in {}",
                l.kind.as_deref().unwrap_or("physical or loopback"),
                config.file.display()
            )
        }));
    }
    // Rules a crashed earlier run of this name left behind go first.
    let scope = crate::scope::Scope::current().map_err(DevError::Runtime)?;
    let here = scope.dir(run_dir);
    for d in [run_dir, here.as_path()] {
        crate::uapi::ensure_private_dir(d).map_err(DevError::Invalid)?;
    }
    let record = here.join(format!("{name}.rules"));
    for r in ops::clear_leftovers(&record, name.as_str()) {
        eprintln!("tapir: {name}: {r}, for an earlier run that did not stop cleanly");
    }
    let l4 = match config.transport {
        Transport::Udp => "udp",
        Transport::Tcp => "tcp",
    };
    let mut applied = ops::Applied::new(name.as_str(), &config.ops, record, l4);
    ops::run_hooks("PreUp", &config.ops.pre_up, name.as_str())?;
    let mut rng = OsRandom::new()
        .map_err(|e| DevError::Runtime(format!("randomness from the kernel: {e}")))?;
    let mut net = match config.transport {
        Transport::Udp => {
            Net::Udp(bind_udp(config.listen_port.unwrap_or(0)).map_err(|e| named(config, e))?)
        }
        Transport::Tcp => {
            let mut seed = [0u8; 8];
            rng.fill(&mut seed);
            Net::Tcp(Box::new(
                bind_tcp(config.listen_port, u64::from_le_bytes(seed))
                    .map_err(|e| named(config, e))?,
            ))
        }
    };
    let (dev, index) = create_device(&mut nl, tun_path, name, config.mode)?;
    let mut bridge = None;
    if config.mode == Mode::Tap {
        let mac = config
            .mac
            .unwrap_or_else(|| tap_mac(&config.private_key.public_key(), name));
        nl.set_mac(index, mac)?;
        if let Some(b) = &config.bridge {
            bridge = join_bridge(&mut nl, index, b, run_dir)?;
        }
    }
    let endpoints: Vec<IpAddr> = peers
        .iter()
        .filter_map(|p| p.endpoint)
        .map(|e| e.ip().to_canonical())
        .collect();
    let mtu = match config.mtu_auto {
        true => auto_mtu(&mut nl, &endpoints, config.mode).unwrap_or(config.mtu),
        false => config.mtu,
    };
    nl.set_mtu(index, mtu)?;
    for a in &config.addresses {
        // Named as the file gives it (it was the netlink request alone).
        nl.add_address(index, *a, None)
            .map_err(|e| DevError::Invalid(format!("{}: address {a}: {}", name, e.reason())))?;
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
    // Shortest prefixes last, as wg-quick: the default routes' rules go in
    // once the more specific routes are there.
    let mut routes = routes;
    routes.sort_by_key(|n| std::cmp::Reverse(n.prefix_len()));
    let mut book = ops::DeviceRoutes::read(&mut nl, index)?;
    for net in &routes {
        match config.ops.table {
            Table::Off => {}
            Table::Id(t) => book.add(&mut nl, name.as_str(), net.trunc(), Some(t))?,
            Table::Auto if net.prefix_len() == 0 => {
                applied.default_route(&mut nl, index, net.trunc(), config.ops.fwmark)?;
            }
            Table::Auto => book.add(&mut nl, name.as_str(), net.trunc(), None)?,
        }
    }
    // The tunnel's own packets carry the mark: policy routing keeps them
    // out of the tunnel (and a firewall can tell them apart).
    if let Some(mark) = applied.mark().or(config.ops.fwmark) {
        let marked = match &mut net {
            Net::Udp(s) => socket2::SockRef::from(&*s).set_mark(mark),
            Net::Tcp(t) => t.set_mark(mark),
        };
        marked.map_err(|e| {
            DevError::Runtime(format!(
                "{name}: marking the tunnel's socket {mark:#x}: {e}"
            ))
        })?;
    }
    applied
        .set_dns(&config.ops.dns)
        .map_err(|e| DevError::Invalid(format!("{name}: {e}")))?;
    let port = match &net {
        Net::Udp(s) => s.local_addr().map(|a| a.port()).unwrap_or(0),
        Net::Tcp(t) => t.local_port(),
    };
    let layer = match config.mode {
        Mode::Tun => Layer::Ip,
        Mode::Tap => Layer::Ethernet,
    };
    let mut tunnel = Tunnel::with_layer(
        config.private_key.clone(),
        peers,
        layer,
        tapir_proto::switch::DEFAULT_AGING,
        tapir_proto::switch::DEFAULT_CAP,
    );
    // (Followed from the device from then on: see `host`.)
    tunnel.set_mtu(mtu as usize);
    tunnel.set_sources_proven(matches!(net, Net::Tcp(_)));
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
        Ok((c, notes)) => {
            for n in notes {
                eprintln!("tapir: {name}: warning: {n}");
            }
            Some(c)
        }
        Err(why) => {
            eprintln!(
                "tapir: {name}: warning: no control socket, so wg show will not see this tunnel: {why}"
            );
            None
        }
    };
    ops::run_hooks("PostUp", &config.ops.post_up, name.as_str())?;
    applied.up_done();
    Ok(Started {
        applied,
        save_to: config.ops.save_config.then(|| config.file.clone()),
        config: config.clone(),
        name: name.clone(),
        dev,
        mode: config.mode,
        net,
        tunnel,
        control,
        port,
        hostnames: host_names(config),
        bridge,
    })
}

/// Gives up every capability but CAP_NET_ADMIN (routes and marks at run
/// time) and CAP_NET_BIND_SERVICE (a port under 1024 given later), for
/// good: once set up, the process parses what arrives from the network.
/// Threads started later inherit it. `TAPIR_KEEP_CAPS=1` keeps them all
/// (for debugging).
pub(crate) fn keep_only_network() {
    if std::env::var_os("TAPIR_KEEP_CAPS").is_none() {
        if let Err(e) = tapir_sys::caps::keep_only_network(true) {
            eprintln!("tapir: warning: could not give up capabilities: {e}");
        }
    }
}

/// Starts every tunnel first (dropping those started if one fails), then
/// runs each on a thread of its own until `shutdown`, or until one fails,
/// which stops the others.
pub fn run_all(
    configs: &[TunnelConfig],
    tun_path: &Path,
    run_dir: &Path,
    shutdown: &AtomicBool,
    reload: &AtomicBool,
) -> Result<(), DevError> {
    let mut started = Vec::new();
    for c in configs {
        started.push(start(c, tun_path, run_dir)?);
    }
    // Set up: from here on the process parses what arrives from the network,
    // so it keeps CAP_NET_ADMIN (to take a bridge it made down again) and
    // CAP_NET_BIND_SERVICE (a port under 1024 given later) alone, and can
    // gain nothing back. Before the threads start: they inherit it.
    // TAPIR_KEEP_CAPS=1 keeps them all (for debugging).
    let users: Vec<&String> = configs.iter().filter_map(|c| c.ops.user.as_ref()).collect();
    let caps_at_down = configs
        .iter()
        .find_map(|c| crate::config::caps_at_down(&c.ops).map(|what| (c, what)));
    if let Some(user) = users.first() {
        // One process, one user: every tunnel of the file runs as it.
        if users.iter().any(|u| u != user) || users.len() != configs.len() {
            return Err(DevError::Invalid(
                "the tunnels of one file run in one process: give them all the same user, or none"
                    .into(),
            ));
        }
        let uid = crate::users::uid(user).map_err(DevError::Invalid)?;
        let gid = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map_or(uid, |u| u.gid.as_raw());
        tapir_sys::caps::become_user(uid, gid)
            .map_err(|e| DevError::Permission(format!("running as user {user}: {e}")))?;
        eprintln!(
            "tapir: running as user {user} (uid {uid}, gid {gid}) with CAP_NET_ADMIN and CAP_NET_BIND_SERVICE only"
        );
    } else if let Some((c, what)) = caps_at_down {
        eprintln!(
            "tapir: {}: keeping root's capabilities for what runs at down ({what})",
            c.name
        );
    } else {
        keep_only_network();
    }
    // SIGHUP sets `reload`; every tunnel's control thread sees the count go
    // up. The threads sleep until there is work: a signal rings the
    // watcher's bell, and the watcher rings each tunnel's (a reload to
    // make, or shutdown), as does a tunnel that fails (to stop the others).
    let reloads = AtomicU64::new(0);
    let all_done = AtomicBool::new(false);
    let runtime = |what: &str, e: io::Error| DevError::Runtime(format!("{what}: {e}"));
    let signals = Bell::new().map_err(|e| runtime("a wake-up socket", e))?;
    let _rings = bell::ring_on_signals(
        &signals,
        &[
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ],
    )
    .map_err(|e| runtime("installing a signal handler", e))?;
    let bells = started
        .iter()
        .map(|_| Bell::new().map(Arc::new))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| runtime("a wake-up socket", e))?;
    std::thread::scope(|s| {
        let reloads = &reloads;
        let all_done = &all_done;
        let signals = &signals;
        let watched = &bells;
        s.spawn(move || {
            loop {
                if signals.wait(None).is_err() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                if reload.swap(false, Ordering::Relaxed) {
                    reloads.fetch_add(1, Ordering::Relaxed);
                }
                for b in watched {
                    b.ring();
                }
                if all_done.load(Ordering::Relaxed) || shutdown.load(Ordering::Relaxed) {
                    break;
                }
            }
            if shutdown.load(Ordering::Relaxed) {
                crate::notify::send("STOPPING=1");
            }
        });
        let handles: Vec<_> = started
            .into_iter()
            .zip(bells.iter().cloned())
            .map(|(t, bell)| {
                s.spawn(move || {
                    let result = t.run(shutdown, reloads, bell);
                    if result.is_err() {
                        shutdown.store(true, Ordering::Relaxed);
                        signals.ring();
                    }
                    result
                })
            })
            .collect();
        // Devices up, sockets bound, packets moving: ready, for systemd.
        crate::notify::send("READY=1");
        let mut first = Ok(());
        for h in handles {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(DevError::Runtime("a tunnel thread panicked".into())));
            if first.is_ok() {
                first = r;
            }
        }
        all_done.store(true, Ordering::Relaxed);
        signals.ring();
        first
    })
}

/// What the directions of a running tunnel share. The tunnel's lock is
/// held for bookkeeping only (routing, counters, replay windows, timers):
/// sealing and opening run outside it, on keys the sessions share read-only
/// (but for a lone message, opened and accepted in one hold of the lock:
/// the other thread waits at most one small message's opening, and the
/// message saves a second round trip).
struct Shared {
    tunnel: Mutex<Tunnel>,
    counters: Counters,
    sources: Sources,
    /// Over UDP, the socket connected to a lone peer (see [`connected`]).
    connected: Option<Connected>,
}

/// Where each peer's datagrams came to (the local address and interface),
/// so that what goes back leaves from there, as the kernel's WireGuard
/// does: on a host with several addresses, a peer that wrote to one and
/// got answers from another was cut off by its stateful firewall or NAT.
/// Learned by the receiving thread from authenticated datagrams; each
/// sending [`Outbox`] keeps a copy, taken again when `version` moves.
#[derive(Default)]
struct Sources {
    map: Mutex<HashMap<SocketAddr, Local>>,
    version: AtomicU64,
}

/// Whether the route to `to` (for packets marked `mark`) leaves by the
/// interface `local` came in on: only then does an answer from `local`
/// go back the way it came.
#[cold]
fn routes_back_through(to: SocketAddr, local: &Local, mark: u32) -> bool {
    Netlink::open()
        .ok()
        .and_then(|mut nl| nl.route_marked(to.ip(), mark).ok().flatten())
        .is_some_and(|r| r.oif == Some(local.ifindex))
}

/// An [`Outbox`]'s copy of [`Sources`], and the last look-up (a batch
/// goes mostly to one peer).
#[derive(Default)]
struct SourceCache {
    map: HashMap<SocketAddr, Local>,
    version: u64,
    last: Option<(SocketAddr, Option<Local>)>,
    /// Where an answer from where the datagram came to would not go back
    /// that way (the receiving side's, see [`Outbox::authenticated`]).
    declined: HashMap<SocketAddr, Local>,
}

/// The most peer addresses [`Sources`] keeps: a peer that roams through
/// NAT ports leaves one behind at each, so past this many they are
/// forgotten at once (and learned again from the next datagrams).
const SOURCES_MAX: usize = 4096;

/// `map`, emptied first if it is full.
fn bounded(map: &mut HashMap<SocketAddr, Local>) -> &mut HashMap<SocketAddr, Local> {
    if map.len() >= SOURCES_MAX {
        map.clear();
    }
    map
}

impl Shared {
    fn tunnel(&self) -> MutexGuard<'_, Tunnel> {
        // A thread that panicked holding the lock stops the tunnel anyway;
        // the other only needs to get to its end.
        self.tunnel.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Totals of both directions, for `tapir status`.
#[derive(Default)]
struct Counters {
    udp_sent: AtomicU64,
    udp_messages: AtomicU64,
    udp_refused: AtomicU64,
    udp_blocked: AtomicU64,
    device_write_errors: AtomicU64,
    /// UDP segmentation offload in use (probed at start, off after an EIO).
    gso_on: AtomicBool,
    /// UDP coalescing on receive in use.
    gro_udp: AtomicBool,
    /// The device handed to the outbound thread, and back (see [`Turn`]).
    turns_out: AtomicU64,
    turns_back: AtomicU64,
    /// Times receives turned to `recvfrom` (see [`LoneMode`]).
    lone_mode: AtomicU64,
}

impl Counters {
    /// Datagrams sent, refused and blocked: what both packet threads sent,
    /// or tried to, so far.
    fn sends(&self) -> u64 {
        [&self.udp_sent, &self.udp_refused, &self.udp_blocked]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

fn add(counter: &AtomicU64, n: usize) {
    // Most are 0 (nothing refused, nothing blocked): no locked instruction for those.
    if n > 0 {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// How a tunnel's messages travel, as one thread holds it: both
/// directions send on the one UDP socket; TCP runs on one thread.
enum Link<'a> {
    Udp(&'a UdpSocket),
    Tcp(&'a mut TcpTransport),
}

/// Datagrams on their way out: a batch, and the link that sends it. Each
/// thread has its own.
struct Outbox<'a> {
    link: Link<'a>,
    tx: Batch,
    /// Slots `0..pending` are set; slot 0's length and destination are
    /// kept in `first` until a second datagram joins it (a lone datagram
    /// leaves by `sendto`, without the batch's headers and records).
    pending: usize,
    first: (SocketAddrV6, usize, Option<Local>),
    gso_on: bool,
    name: &'a IfName,
    counters: &'a Counters,
    sources: &'a Sources,
    cache: SourceCache,
    /// Whether datagrams come with their local address (the host has more
    /// than one: see [`Outbox::take_host`]); `None` before the first look.
    sticky: Option<bool>,
    /// The host's interface addresses at the last look (TCP: see
    /// [`TcpTransport::close_orphans`]; UDP: the connected socket's is one).
    host_addresses: Vec<IpAddr>,
    /// Datagrams counted as sent to a peer that did not leave (refused by
    /// the kernel, a full buffer; over TCP no connection, a full queue):
    /// taken off the peer's transfer at the next [`Outbox::queue_transmit`].
    unsent: Vec<(SocketAddr, usize)>,
    /// The socket connected to a lone peer (UDP), and where it was last
    /// seen connected: a lone datagram to there leaves by it.
    connected: Option<&'a Connected>,
    connected_seen: connected::Seen,
}

/// At most this many unsent datagrams wait to be taken off a transfer
/// (more are forgotten: the count is then high, never the memory).
const UNSENT_KEPT: usize = 4096;

/// How long a send waits for room in a full socket buffer before dropping.
const SEND_PATIENCE: Duration = Duration::from_millis(20);

impl<'a> Outbox<'a> {
    fn new(link: Link<'a>, name: &'a IfName, shared: &'a Shared) -> Self {
        let (counters, sources) = (&shared.counters, &shared.sources);
        Self {
            link,
            tx: Batch::new(BATCH, SLOT),
            pending: 0,
            first: (SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, 0), 0, None),
            gso_on: counters.gso_on.load(Ordering::Relaxed),
            name,
            counters,
            sources,
            cache: SourceCache::default(),
            sticky: None,
            host_addresses: Vec::new(),
            unsent: Vec::new(),
            connected: shared.connected.as_ref(),
            connected_seen: connected::Seen::default(),
        }
    }

    /// Takes what the host watcher saw ([`host::Seen`]).
    ///
    /// Over UDP, whether answers must be told where to leave from: where
    /// the host (this namespace) has more than one global address of a
    /// family, outside the tunnel's own device, a peer may write to any of
    /// them, and an answer from the kernel's choice can come from another.
    /// Only then are datagrams asked for their local address, which costs
    /// a ping about 0.5 µs at each end, and answers sent with it.
    ///
    /// Over TCP, a connection from an address the host no longer has is
    /// closed (and dialed again) at once, rather than when its segments
    /// have gone unanswered for `TCP_USER_TIMEOUT`.
    fn take_host(&mut self, seen: &host::Seen, now: Instant) {
        let socket = match &mut self.link {
            Link::Udp(socket) => *socket,
            Link::Tcp(t) => {
                t.close_orphans(&self.host_addresses, &seen.addresses, now);
                self.host_addresses.clone_from(&seen.addresses);
                return;
            }
        };
        // (The connected socket's address is looked for in them.)
        self.host_addresses.clone_from(&seen.addresses);
        let Some(want) = seen.sticky else {
            return;
        };
        if self.sticky != Some(want) {
            tapir_sys::mmsg::set_pktinfo(socket.as_fd(), want);
            if self.sticky.is_some() && !want {
                self.forget_sources();
            }
            self.sticky = Some(want);
        }
    }

    /// Where a datagram for `to` leaves from: where `to`'s last came to.
    #[inline]
    fn source_for(&mut self, to: SocketAddr) -> Option<Local> {
        let version = self.sources.version.load(Ordering::Acquire);
        let c = &mut self.cache;
        if version != c.version {
            c.map = self
                .sources
                .map
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            c.version = version;
            c.last = None;
        }
        match c.last {
            Some((a, l)) if a == to => l,
            _ => {
                let l = c.map.get(&to).copied();
                c.last = Some((to, l));
                l
            }
        }
    }

    /// What goes to `to` leaves from the kernel's choice, until it writes
    /// again (and what it wrote to is checked again).
    fn forget_source(&mut self, to: SocketAddr) {
        self.cache.declined.remove(&to);
        let mut m = self.sources.map.lock().unwrap_or_else(|e| e.into_inner());
        if m.remove(&to).is_some() {
            drop(m);
            self.sources.version.fetch_add(1, Ordering::Release);
        }
    }

    /// Datagrams could not leave from where they came to (the address is
    /// gone): the kernel chooses again, for every peer, until they write.
    #[cold]
    fn forget_sources(&mut self) {
        self.cache.declined.clear();
        self.sources
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.sources.version.fetch_add(1, Ordering::Release);
    }

    /// Sends what is queued.
    #[inline]
    fn flush(&mut self, now: Instant) {
        if self.pending > 0 {
            self.send_pending(now);
        }
    }

    fn send_pending(&mut self, now: Instant) {
        // TCP frames every datagram from the batch's records.
        if self.pending == 1 && matches!(self.link, Link::Tcp(_)) {
            self.record_first();
        }
        match &mut self.link {
            Link::Udp(socket) => {
                let was = self.gso_on;
                let (to, len, from) = self.first;
                let r = if self.pending == 1 {
                    // To the lone peer by its connected socket (where that
                    // is not connected, or its address is gone, by the
                    // tunnel's).
                    let seen = &mut self.connected_seen;
                    let via = self
                        .connected
                        .filter(|c| from.is_none() && seen.to(c) == Some(to));
                    let tx = &mut self.tx;
                    let r = via.map(|c| {
                        let r = tx.send_connected(c.fd(), 0, len, SEND_PATIENCE);
                        if r == ConnectedSend::Stale {
                            c.mark_stale();
                        }
                        r
                    });
                    match r {
                        Some(ConnectedSend::Done(r)) => r,
                        _ => tx.send_one(socket.as_fd(), 0, len, &to, from, SEND_PATIENCE),
                    }
                } else {
                    self.tx.send_gso(
                        socket.as_fd(),
                        self.pending,
                        &mut self.gso_on,
                        SEND_PATIENCE,
                    )
                };
                let c = self.counters;
                add(&c.udp_sent, r.sent);
                add(&c.udp_messages, r.messages);
                add(&c.udp_refused, r.refused);
                add(&c.udp_blocked, r.blocked);
                if r.stale_local {
                    self.forget_sources();
                }
                if r.refused + r.blocked > 0 {
                    for &i in self.tx.dropped() {
                        let (to, len) = match self.pending {
                            1 => (to, len),
                            _ => {
                                let (bytes, to) = self.tx.outgoing(i);
                                (to, bytes.len())
                            }
                        };
                        if self.unsent.len() < UNSENT_KEPT {
                            self.unsent.push((from_v6(SocketAddr::V6(to)), len));
                        }
                    }
                }
                if was && !self.gso_on && c.gso_on.swap(false, Ordering::Relaxed) {
                    eprintln!(
                        "tapir: {}: the kernel refuses segmented UDP sends (EIO): UDP GSO off, one datagram per message",
                        self.name
                    );
                }
            }
            Link::Tcp(t) => {
                t.send(&self.tx, self.pending, now);
                let room = UNSENT_KEPT.saturating_sub(self.unsent.len());
                let n = t.unsent.len().min(room);
                self.unsent.extend(t.unsent.drain(..).take(n));
            }
        }
        self.pending = 0;
    }

    /// Writes the first datagram's length and destination, kept aside
    /// while it was alone, into the batch's records for slot 0.
    fn record_first(&mut self) {
        let (to, len, from) = self.first;
        self.tx.set(0, len, &to);
        self.tx.set_local(0, from);
    }

    /// Slot `pending` holds a datagram of `len` bytes for `to`: queue it.
    fn push(&mut self, to: SocketAddr, len: usize, now: Instant) {
        let from = match self.link {
            Link::Udp(_) => self.source_for(to),
            Link::Tcp(_) => None,
        };
        let to = to_v6(to);
        match self.pending {
            0 => self.first = (to, len, from),
            n => {
                if n == 1 {
                    self.record_first();
                }
                self.tx.set(n, len, &to);
                self.tx.set_local(n, from);
            }
        }
        self.pending += 1;
        if self.pending == BATCH {
            self.flush(now);
        }
    }

    /// Seals a copy of `frame` for peer `p` into the next slot, with the
    /// tunnel locked (flooding and forwarding between tap peers).
    fn seal_copy(
        &mut self,
        tunnel: &mut Tunnel,
        p: usize,
        frame: &[u8],
        now: Instant,
        wall: Duration,
        rng: &mut OsRandom,
    ) {
        let len = frame.len().min(SLOT - 64);
        let slot = self.tx.slot_mut(self.pending);
        slot[16..16 + len].copy_from_slice(&frame[..len]);
        if let Encapsulated::Send { to, len } = tunnel.encapsulate_to(p, now, wall, rng, slot, len)
        {
            self.push(to, len, now);
        }
    }

    /// Handshakes, cookie replies, keepalives, and packets that waited for
    /// a handshake or a rate limit.
    fn transmit(&mut self, shared: &Shared, now: Instant) {
        self.queue_transmit(&mut shared.tunnel(), now);
        self.flush(now);
    }

    /// What [`Outbox::transmit`] sends, queued (with the tunnel locked).
    #[inline]
    fn queue_transmit(&mut self, t: &mut Tunnel, now: Instant) {
        if !self.unsent.is_empty() {
            self.settle_unsent(t);
        }
        if !t.may_transmit() {
            return;
        }
        loop {
            let slot = self.tx.slot_mut(self.pending);
            let Some((to, len)) = t.poll_transmit(now, slot) else {
                break;
            };
            self.push(to, len, now);
        }
    }

    /// Takes what did not leave off the transfers it was counted in.
    #[cold]
    fn settle_unsent(&mut self, t: &mut Tunnel) {
        t.not_sent_all(&self.unsent);
        self.unsent.clear();
    }

    /// A message from `from` authenticated: a TCP connection from there is
    /// a peer's (the one `tunnel` now has there), and its only one.
    fn authenticated(
        &mut self,
        from: SocketAddr,
        local: Option<Local>,
        tunnel: &Tunnel,
        now: Instant,
    ) {
        match &mut self.link {
            Link::Tcp(t) => {
                if t.authenticated(from) {
                    if let Some(peer) = tunnel.peer_at(from) {
                        t.owned_by(from, peer, now);
                    }
                }
            }
            // Where `from` wrote to, for what goes back (see [`Sources`]):
            // the shared map only when it changes.
            Link::Udp(socket) => {
                let socket: &UdpSocket = socket;
                let Some(l) = local else {
                    return;
                };
                if self.source_for(from) == local || self.cache.declined.get(&from) == Some(&l) {
                    return;
                }
                // As the kernel's WireGuard: only where the route back
                // leaves by the interface it came in on (else an answer
                // from there takes the other way, or none). Decided once
                // for each (peer address, local end).
                let mark = socket2::SockRef::from(socket).mark().unwrap_or(0);
                let stick = routes_back_through(from, &l, mark);
                if !stick {
                    bounded(&mut self.cache.declined).insert(from, l);
                }
                let mut m = self.sources.map.lock().unwrap_or_else(|e| e.into_inner());
                if stick {
                    bounded(&mut m).insert(from, l);
                } else {
                    m.remove(&from);
                }
                drop(m);
                self.sources.version.fetch_add(1, Ordering::Release);
            }
        }
    }
}

/// Segment `i` of a packet read from the device, cut into `dst`: the
/// `i`th segment of a TSO super-packet, or the packet itself.
fn cut(hdr: &VnetHeader, packet: &[u8], l2: usize, i: usize, dst: &mut [u8]) -> Option<usize> {
    if hdr.is_gso() {
        vnet::segment_at(hdr, packet, l2, i, dst).ok()
    } else {
        let len = packet.len().min(dst.len());
        dst[..len].copy_from_slice(&packet[..len]);
        Some(len)
    }
}

/// Device to network: reads (TSO super-packets), cuts segments into the
/// batch, takes their counters under the lock and seals them outside it.
struct Outbound<'a> {
    dev: &'a TunDevice,
    name: &'a IfName,
    tap: bool,
    /// One device read: the vnet header and up to 64 KiB.
    big: Vec<u8>,
    sealer: Sealer,
    /// Wake-ups in a row that read one packet and then found the device
    /// empty (a ping, a keepalive): see [`habitual`].
    lone: u32,
}

/// What sealing the segments of a read takes (apart from the read's
/// buffer, borrowed alongside).
struct Sealer {
    rng: OsRandom,
    /// A segment being flooded.
    scratch: Vec<u8>,
    /// The lengths of the segments cut into the batch.
    lens: Vec<usize>,
    /// (slot, length, job, destination) of the segments to seal.
    jobs: Vec<(usize, usize, SealJob, SocketAddr)>,
}

impl<'a> Outbound<'a> {
    fn new(dev: &'a TunDevice, name: &'a IfName, tap: bool) -> Result<Self, DevError> {
        Ok(Self {
            dev,
            name,
            tap,
            big: vec![0u8; vnet::LEN + 65536],
            sealer: Sealer {
                rng: OsRandom::new()
                    .map_err(|e| DevError::Runtime(format!("randomness from the kernel: {e}")))?,
                scratch: vec![0u8; SLOT],
                lens: Vec::with_capacity(BATCH),
                jobs: Vec::with_capacity(BATCH),
            },
            lone: 0,
        })
    }

    /// Reads the device until it is empty or a batch's worth was read.
    /// Returns how many packets (segments of super-packets counted one by
    /// one) it read.
    fn read_device(
        &mut self,
        shared: &Shared,
        out: &mut Outbox,
        now: Instant,
        wall: Duration,
    ) -> Result<usize, DevError> {
        let Self {
            dev,
            name,
            tap,
            big,
            sealer,
            lone,
        } = self;
        let mut read = 0;
        for i in 0..BATCH {
            if i == 1 {
                // The first packet of a wake-up leaves before the next read
                // (which is, for a lone packet such as a ping, a read that
                // finds nothing): what follows it still goes in batches.
                out.flush(now);
                // Where wake-ups have found one packet only, that read is
                // left out: a packet that came meanwhile is seen by the
                // next wait (the device stays readable).
                if habitual(*lone) {
                    *lone = lone.wrapping_add(1);
                    return Ok(read);
                }
            }
            let n = match dev.read(big) {
                Ok(n) => n,
                // (By its errno: cheaper than decoding the error's kind.)
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    // After how many packets the device was empty.
                    match i {
                        0 => {}
                        1 => *lone = lone.wrapping_add(1),
                        _ => *lone = 0,
                    }
                    break;
                }
                Err(e) => {
                    return Err(DevError::Runtime(format!(
                        "{}: reading the device: {e}",
                        name
                    )));
                }
            };
            let Some(hdr) = VnetHeader::parse(&big[..n]) else {
                continue;
            };
            let packet = &mut big[vnet::LEN..n];
            // Where the IP header starts: 0 on a tun, after the Ethernet header on a tap.
            let l2 = if *tap {
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
            let l2 = l2.unwrap_or(0);
            read += count;
            // One routing decision for all the segments: they share their headers.
            let mut t = shared.tunnel();
            match t.target(now, packet) {
                Target::Peer(p) => {
                    // A lone packet keeps the lock from its route to its
                    // counter (one round trip, not two); the segments of a
                    // super-packet are cut without it, and their peer is
                    // found again by its key (a removal meanwhile moves
                    // the indices: they must not be sealed for another).
                    let (held, key) = if hdr.is_gso() {
                        let key = t.peer_key(p);
                        drop(t);
                        (None, key)
                    } else {
                        (Some(t), None)
                    };
                    let segments = (&hdr, &*packet, l2, count);
                    sealer.seal_segments(shared, held, out, (p, key), segments, now, wall)
                }
                Target::Flood => {
                    // Broadcasts and unknown destinations (tap mode): a
                    // copy for every peer, sealed with the tunnel locked.
                    for i in 0..count {
                        let Some(len) = cut(&hdr, packet, l2, i, &mut sealer.scratch[..SLOT - 64])
                        else {
                            break;
                        };
                        for p in 0..t.peer_count() {
                            out.seal_copy(
                                &mut t,
                                p,
                                &sealer.scratch[..len],
                                now,
                                wall,
                                &mut sealer.rng,
                            );
                        }
                    }
                }
                Target::Nowhere(_) => {}
            }
        }
        Ok(read)
    }
}

impl Sealer {
    /// The `count` segments of one read, all for peer `p`: cut into free
    /// slots, counters taken with the tunnel locked (`held`: already), sealed
    /// without it. With `key`, the lock was let go since `p` was found: the
    /// peer is looked up again by its key each time it is taken.
    #[allow(clippy::too_many_arguments)]
    fn seal_segments(
        &mut self,
        shared: &Shared,
        mut held: Option<MutexGuard<'_, Tunnel>>,
        out: &mut Outbox,
        (p, key): (usize, Option<PublicKey>),
        (hdr, packet, l2, count): (&VnetHeader, &[u8], usize, usize),
        now: Instant,
        wall: Duration,
    ) {
        if count == 1 && out.pending < BATCH {
            // A lone packet (a ping, an ACK): no batch records.
            let at = out.pending;
            let slot = out.tx.slot_mut(at);
            let Some(len) = cut(hdr, packet, l2, 0, &mut slot[16..SLOT - 48]) else {
                return;
            };
            let mut t = held.unwrap_or_else(|| shared.tunnel());
            let Some(p) = key.map_or(Some(p), |k| t.peer_index(&k)) else {
                return;
            };
            let sealing = t.prepare_to(p, now, wall, &mut self.rng, slot, len);
            drop(t);
            if let Sealing::Seal { job, to } = sealing {
                if let Ok(n) = job.seal(out.tx.slot_mut(at), len) {
                    out.push(to, n, now);
                }
            }
            return;
        }
        let mut i = 0;
        while i < count {
            let first = out.pending;
            let want = (BATCH - first).min(count - i);
            self.lens.clear();
            for j in 0..want {
                let slot = out.tx.slot_mut(first + j);
                match cut(hdr, packet, l2, i + j, &mut slot[16..SLOT - 48]) {
                    Some(len) => self.lens.push(len),
                    None => break,
                }
            }
            let complete = self.lens.len() == want;
            {
                let mut t = held.take().unwrap_or_else(|| shared.tunnel());
                let Some(p) = key.map_or(Some(p), |k| t.peer_index(&k)) else {
                    return;
                };
                for (j, &len) in self.lens.iter().enumerate() {
                    let slot = out.tx.slot_mut(first + j);
                    if let Sealing::Seal { job, to } =
                        t.prepare_to(p, now, wall, &mut self.rng, slot, len)
                    {
                        self.jobs.push((first + j, len, job, to));
                    }
                }
            }
            // The cipher work, with the lock free for the other direction.
            for (slot, len, job, to) in self.jobs.drain(..) {
                let at = out.pending;
                if slot != at {
                    // A segment before it was queued or dropped instead.
                    out.tx.copy_slot(slot, at, 16 + len);
                }
                if let Ok(n) = job.seal(out.tx.slot_mut(at), len) {
                    out.push(to, n, now);
                }
            }
            if !complete {
                break;
            }
            i += want;
        }
    }
}

/// A datagram (or one segment of a coalesced one) on its way in.
struct Rec {
    /// Where: batch slot, offset, length.
    i: usize,
    at: usize,
    len: usize,
    from: SocketAddr,
    opening: Option<Opening>,
    opened: Result<usize, SessionError>,
    /// What to write to the device, within `slot[at..]`.
    deliver: Option<std::ops::Range<usize>>,
}

/// Network to device: the batch's messages looked up with the tunnel
/// locked, opened without it, accepted with it, and written to the
/// device (TCP segments coalesced) without it.
struct Inbound<'a> {
    dev: &'a TunDevice,
    name: &'a IfName,
    tap: bool,
    rng: OsRandom,
    gro: vnet::Coalescer,
    gro_on: bool,
    /// A packet a rate limit held back on arrival, released.
    held: Vec<u8>,
    recs: Vec<Rec>,
    counters: &'a Counters,
}

impl<'a> Inbound<'a> {
    fn new(
        dev: &'a TunDevice,
        name: &'a IfName,
        tap: bool,
        counters: &'a Counters,
    ) -> Result<Self, DevError> {
        Ok(Self {
            dev,
            name,
            tap,
            rng: OsRandom::new()
                .map_err(|e| DevError::Runtime(format!("randomness from the kernel: {e}")))?,
            gro: vnet::Coalescer::new(),
            gro_on: true,
            held: vec![0u8; SLOT],
            recs: Vec::with_capacity(BATCH),
            counters,
        })
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
            // One that does not join the run may start the next (a packet
            // that joins nothing, such as a ping, is not tried twice).
            if !self.gro.is_empty() {
                self.flush_gro();
                if self.gro.push_at(&buf[range.clone()], l2) {
                    return;
                }
            }
        }
        self.flush_gro();
        let start = range.start - vnet::LEN;
        buf[start..range.start].fill(0);
        if self.dev.write(&buf[start..range.end]).is_err() {
            add(&self.counters.device_write_errors, 1);
        }
    }

    /// Writes a coalesced super-packet. A kernel that refuses GSO writes
    /// (EINVAL) turns GRO off for the rest of the run, said once; TCP
    /// resends what was lost.
    #[inline]
    fn flush_gro(&mut self) {
        if !self.gro.is_empty() {
            self.write_gro();
        }
    }

    fn write_gro(&mut self) {
        let Some(bytes) = self.gro.flush() else {
            return;
        };
        if let Err(e) = self.dev.write(bytes) {
            add(&self.counters.device_write_errors, 1);
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
        shared: &Shared,
        rx: &mut Batch,
        got: usize,
        out: &mut Outbox,
        now: Instant,
        wall: Duration,
    ) {
        if got == 1 && rx.segment_size(0).is_none() {
            let local = rx.local(0);
            let (datagram, from) = rx.datagram_mut(0);
            let len = datagram.len();
            let from = from_v6(SocketAddr::V6(from));
            self.open_lone(shared, rx.slot_mut(0), len, (from, local), out, now, wall);
            return;
        }
        let mut recs = std::mem::take(&mut self.recs);
        recs.clear();
        let mut t = shared.tunnel();
        for i in 0..got {
            let seg = rx.segment_size(i);
            let local = rx.local(i);
            let (datagram, from) = rx.datagram_mut(i);
            let total = datagram.len();
            let from = from_v6(SocketAddr::V6(from));
            let (slot, _) = rx.slot_with_len(i);
            let step = seg.unwrap_or(total).max(1);
            let mut at = 0;
            while at < total {
                let len = step.min(total - at);
                match t.receive(now, wall, &mut self.rng, from, &mut slot[at..], len) {
                    Received::Open(opening) => recs.push(Rec {
                        i,
                        at,
                        len,
                        from,
                        opening: Some(opening),
                        opened: Err(SessionError::Malformed),
                        deliver: None,
                    }),
                    // Handshakes and cookies: answered through poll_transmit.
                    Received::Done(Decapsulated::Dropped(_)) => {}
                    Received::Done(_) if proves_a_peer(&slot[at..at + len]) => {
                        out.authenticated(from, local, &t, now)
                    }
                    Received::Done(_) => {}
                }
                at += len;
            }
        }
        // The cipher work, with the lock free for the other direction.
        drop(t);
        for r in &mut recs {
            let (slot, _) = rx.slot_with_len(r.i);
            if let Some(o) = &r.opening {
                r.opened = o.open(&mut slot[r.at..r.at + r.len]);
            }
        }
        {
            let mut t = shared.tunnel();
            for r in &mut recs {
                let Some(opening) = r.opening.take() else {
                    continue;
                };
                let (slot, _) = rx.slot_with_len(r.i);
                let msg = &slot[r.at..r.at + r.len];
                let d = t.accept(now, wall, &mut self.rng, r.from, opening, r.opened, msg);
                if matches!(d, Decapsulated::Dropped(_)) {
                    continue;
                }
                r.deliver = self.dispatch(&mut t, d, msg, out, now, wall);
                out.authenticated(r.from, rx.local(r.i), &t, now);
            }
        }
        for r in &recs {
            if let Some(range) = r.deliver.clone() {
                let (slot, _) = rx.slot_with_len(r.i);
                self.deliver(&mut slot[r.at..], range);
            }
        }
        self.flush_gro();
        self.recs = recs;
    }

    /// [`Inbound::open_received`] for a lone datagram (a ping, an ACK): the
    /// tunnel's lock held from its receipt through its opening to its
    /// acceptance (one round trip, not two: the other thread waits at most
    /// one small message's opening), and no batch records.
    #[allow(clippy::too_many_arguments)]
    fn open_lone(
        &mut self,
        shared: &Shared,
        slot: &mut [u8],
        len: usize,
        (from, local): (SocketAddr, Option<Local>),
        out: &mut Outbox,
        now: Instant,
        wall: Duration,
    ) {
        let mut t = shared.tunnel();
        let d = match t.decapsulate_lone(now, from, slot, len) {
            Some(d) => d,
            None => decapsulate_whole(&mut t, now, wall, &mut self.rng, from, slot, len),
        };
        if matches!(d, Decapsulated::Dropped(_)) {
            return;
        }
        let msg = &slot[..len];
        let deliver = self.dispatch(&mut t, d, msg, out, now, wall);
        if proves_a_peer(msg) {
            out.authenticated(from, local, &t, now);
        }
        drop(t);
        if let Some(range) = deliver {
            self.deliver(slot, range);
        }
        self.flush_gro();
    }

    /// What an accepted message (`msg`, opened) asks for, with the tunnel
    /// locked: a packet for another peer sealed for it, a flood for every
    /// other peer; what is for the device is returned, for the caller to
    /// deliver.
    fn dispatch(
        &mut self,
        t: &mut Tunnel,
        d: Decapsulated,
        msg: &[u8],
        out: &mut Outbox,
        now: Instant,
        wall: Duration,
    ) -> Option<std::ops::Range<usize>> {
        match d {
            Decapsulated::Packet(range) => Some(range),
            Decapsulated::Forward { range, to } => {
                out.seal_copy(t, to, &msg[range], now, wall, &mut self.rng);
                None
            }
            Decapsulated::Flood { range, from } => {
                for p in (0..t.peer_count()).filter(|&p| p != from) {
                    out.seal_copy(t, p, &msg[range.clone()], now, wall, &mut self.rng);
                }
                Some(range)
            }
            Decapsulated::Nothing | Decapsulated::Dropped(_) => None,
        }
    }

    /// Packets that a peer's rate limit held back on arrival, now due
    /// (with the tunnel locked; the caller flushes `out` and the GRO run).
    fn release_held(&mut self, t: &mut Tunnel, out: &mut Outbox, now: Instant, wall: Duration) {
        if !t.has_rates() {
            return;
        }
        let mut held = std::mem::take(&mut self.held);
        while let Some(d) = t.poll_received(now, &mut held) {
            if let Some(range) = self.dispatch(t, d, &held, out, now, wall) {
                self.deliver(&mut held, range);
            }
        }
        self.held = held;
    }
}

/// Whether a message the tunnel took shows that its sender holds a peer's
/// key: a handshake or data, not a cookie reply (whose key is derived from
/// our public key, and which anyone who saw our handshake can make).
fn proves_a_peer(msg: &[u8]) -> bool {
    msg.first() != Some(&3)
}

/// [`Tunnel::decapsulate`] with the tunnel locked, for what
/// [`Tunnel::decapsulate_lone`] leaves (handshakes, rekeys, rate limits):
/// out of line, so that a lone data message's path stays small.
#[inline(never)]
fn decapsulate_whole(
    t: &mut Tunnel,
    now: Instant,
    wall: Duration,
    rng: &mut OsRandom,
    from: SocketAddr,
    slot: &mut [u8],
    len: usize,
) -> Decapsulated {
    t.decapsulate(now, wall, rng, from, slot, len)
}

/// Threads per direction over UDP: one each (device to network; network
/// to device with the timers), or, with `TAPIR_THREADS=1`, one thread for
/// both.
///
/// With two, the device is read by the network thread while traffic is
/// light and by the outbound thread during bursts ([`Turn`]), so a ping
/// through the tunnel takes what it takes through one thread (median
/// 0.08-0.10 ms on the 2-core development machine, against 0.10-0.11 with
/// both threads always waiting on their own descriptor). There, with
/// iperf3 and both tunnel ends sharing the two cores, one thread still
/// moved about 10% more (4.56 against 4.19 Gbit/s, the mean of four
/// alternating runs): `TAPIR_THREADS=1` is for such small, shared hosts.
fn threads_per_direction() -> usize {
    match std::env::var("TAPIR_THREADS").as_deref() {
        Ok("1") => 1,
        _ => 2,
    }
}

/// Whether a habit that has held `n` times in a row is trusted this time:
/// from [`HABIT_TRUSTED`] times on, except every [`HABIT_PROBE`]th, which
/// checks that it still holds.
///
/// A wake-up that reads a packet from the device reads again until the
/// device is empty; for a lone packet (a ping, a keepalive) that second
/// read is a system call that finds nothing. And the network thread reads
/// the device after each write to it (see `inbound_loop`), for the answer
/// a write often has; at the end that sent a ping, there is none. Where
/// wake-ups keep finding that, the read is left out: the device stays
/// readable, so what came meanwhile is seen by the next wait, one wait
/// later. Likewise a receive that keeps finding one datagram (not one the
/// kernel coalesced: under load those come one at a time too) asks the
/// kernel for one, which then does not look at an empty queue for a
/// second (pinned A/B, three runs of five: RTT -0.2 to -1.8 µs, one TCP
/// stream the same). On the 2-core development machine, a ping through a tunnel made
/// 11.4 system calls instead of 14 (both ends), and took 24.5 µs instead of
/// 25.3 pinned to one CPU (CPU 20.8 µs against 21.6; 5 alternating runs of
/// 2,000 pings); one TCP stream moved the same (4.70 against 4.67 Gbit/s,
/// 5 alternating runs): its wake-ups read several packets.
///
/// The counts wrap (at a million wake-ups a second, after an hour and a
/// quarter): the habit is then learnt again, where a saturated count would
/// be trusted without a check ever after.
fn habitual(n: u32) -> bool {
    n >= HABIT_TRUSTED && n % HABIT_PROBE != 0
}
const HABIT_TRUSTED: u32 = 4;
const HABIT_PROBE: u32 = 8;

/// Lone datagrams received by `recvfrom(2)` rather than `recvmsg(2)`,
/// which costs the kernel more (a ping through a tunnel, pinned to one
/// CPU: 0.4 µs more; its control messages cost nothing, its header does):
/// where receives keep finding one datagram ([`LONE_MODE_AFTER`] in a
/// row) and no control message is wanted (no local addresses: see
/// `Outbox::take_host`). `recvfrom` cannot say that the kernel
/// coalesced a datagram, so `UDP_GRO` goes off meanwhile, and on again at
/// the first receive that finds several (bulk traffic, which GRO is for).
#[derive(Default)]
struct LoneMode {
    /// `recvfrom` in use, and GRO off where it was on.
    on: bool,
    /// GRO went off, and the datagrams waiting then (any of them
    /// coalesced, its segment size now untold) may not all be received:
    /// receives are batches until one finds the socket empty, and not
    /// before this time; a datagram in them is split where it bears the
    /// marks of several ([`messages::coalesced_size`]).
    suspect_until: Option<Instant>,
}
const LONE_MODE_AFTER: u32 = 64;
/// How long after GRO went off receives stay suspect at least: the kernel
/// decides whether to cut a coalesced datagram when it queues it, looking
/// at the option without the socket's lock, so one that passed the look
/// as the option went off can be queued after a receive found the socket
/// empty (a microsecond's window; longer where a virtual CPU is held up).
const SUSPECT_FOR: Duration = Duration::from_millis(10);

impl LoneMode {
    /// Whether it may start or go on: lone receives in a row, and no local
    /// addresses wanted.
    fn fits(lone_in: u32, sticky: Option<bool>) -> bool {
        lone_in >= LONE_MODE_AFTER && sticky == Some(false)
    }

    fn enter(&mut self, s: BorrowedFd, gro: bool, c: &Counters, now: Instant) {
        if gro && !tapir_sys::mmsg::set_gro(s, false) {
            return;
        }
        self.on = true;
        self.suspect_until = gro.then(|| now + SUSPECT_FOR);
        add(&c.lone_mode, 1);
    }

    fn leave(&mut self, s: BorrowedFd, gro: bool, c: &Counters) {
        if gro && !tapir_sys::mmsg::set_gro(s, true) {
            c.gro_udp.store(false, Ordering::Relaxed);
        }
        *self = LoneMode::default();
    }
}

/// What the inbound loop serves besides packets.
struct Control<'a> {
    link: &'a control::ControlLink,
    port: u16,
    mode: Mode,
    /// Peers whose endpoint is a host name, to look up again on reconnect.
    hostnames: &'a [(PublicKey, String)],
    /// The mark on the tunnel's sockets at start (0: none).
    fwmark: u32,
    /// What the host watcher saw (see [`host`]).
    host: &'a host::HostFacts,
}

/// A wake-up that reads this many packets or more from the device is a
/// burst: the outbound thread takes the device over if the network side is
/// busy too.
const BURST: usize = 8;
/// A receive of this many bytes or more makes the network side busy, for
/// [`HANDBACK_IDLE`].
const NET_BUSY_BYTES: usize = 65536;
/// The outbound thread gives the device back after this long without a
/// packet or without a busy network side, or after this many wake-ups in
/// a row that read one packet.
const HANDBACK_IDLE: Duration = Duration::from_millis(20);
const LIGHT_WAKES: u32 = 32;

/// Which of the two threads reads the device (UDP, a thread per direction).
///
/// While traffic is light, or heavy in one direction only, the network
/// thread does: what it writes to the device and the answer to it (a ping's
/// reply, a TCP ACK) then stay on one thread, and no other thread sleeps on
/// the device to be woken on the other core by every write (a wake-up that
/// cost a ping through the tunnel about 15 µs here). When both directions
/// are busy (a burst from the device while the network side receives 64 KiB
/// batches) the device goes to the outbound thread, and the two directions
/// run side by side; it comes back when either is quiet again.
///
/// One direction alone gains nothing from the second thread: an upload's
/// other direction is its ACKs, a few per cent of the work, and sharing the
/// device cost the sealing thread wake-ups and the lock (2-core development
/// machine, one stream, two runs each: 4.19 and 4.19 Gbit/s when a burst
/// alone handed the device over, 5.05 and 5.26 when it takes both
/// directions; 4 streams 4.53/4.58 against 4.79/5.03; both directions at
/// once, one stream each way, 4.01/4.12 against 4.25/4.23).
struct Turn {
    /// The outbound thread has the device.
    outbound: AtomicBool,
    /// Where the outbound thread waits for its turn.
    parked: Mutex<()>,
    wake_outbound: std::sync::Condvar,
    /// Rung by the outbound thread when it gives the device back (the
    /// network thread then puts the device in its poll set), or stops: the
    /// network thread's one bell, which the control thread rings too (one
    /// descriptor fewer to poll, each time it sleeps).
    wake_inbound: Arc<Bell>,
    /// When the network side last received a busy batch (µs since `epoch`;
    /// `u64::MAX`: never).
    net_busy_at: AtomicU64,
    epoch: Instant,
}

impl Turn {
    fn new(wake_inbound: Arc<Bell>) -> Self {
        Self {
            outbound: AtomicBool::new(false),
            parked: Mutex::new(()),
            wake_outbound: std::sync::Condvar::new(),
            wake_inbound,
            net_busy_at: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
        }
    }

    /// The network side received a batch of [`NET_BUSY_BYTES`] or more.
    fn mark_net_busy(&self, now: Instant) {
        let at = now.saturating_duration_since(self.epoch).as_micros();
        self.net_busy_at
            .store(u64::try_from(at).unwrap_or(u64::MAX - 1), Ordering::Relaxed);
    }

    /// Whether it did within [`HANDBACK_IDLE`].
    fn net_busy(&self, now: Instant) -> bool {
        let at = self.net_busy_at.load(Ordering::Relaxed);
        let now = now.saturating_duration_since(self.epoch).as_micros();
        at != u64::MAX && now.saturating_sub(u128::from(at)) < HANDBACK_IDLE.as_micros()
    }

    /// The network thread hands the device over.
    fn to_outbound(&self, c: &Counters) {
        let _g = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        self.outbound.store(true, Ordering::Release);
        add(&c.turns_out, 1);
        self.wake_outbound.notify_one();
    }

    /// The outbound thread gives it back.
    fn to_inbound(&self, c: &Counters) {
        self.outbound.store(false, Ordering::Release);
        add(&c.turns_back, 1);
        self.wake_inbound.ring();
    }

    /// Wakes the parked outbound thread to see that it is to stop (taking
    /// the lock, so that the wake-up cannot fall between its look at the
    /// flag and its wait).
    fn stop_outbound(&self) {
        let _g = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        self.wake_outbound.notify_one();
    }
}

/// The device-to-network direction on a thread of its own (UDP), when it
/// has the device (see [`Turn`]).
fn outbound_loop(
    half: &Mutex<DeviceHalf>,
    turn: &Turn,
    dev: &TunDevice,
    shared: &Shared,
    stop: &dyn Fn() -> bool,
) -> Result<(), DevError> {
    let mut light = 0;
    let mut last_packet = Instant::now();
    let mut clock = WallClock::new();
    while !stop() {
        if !turn.outbound.load(Ordering::Acquire) {
            // Parked until its turn, or until it is to stop (see `Turn::stop_outbound`).
            let g = turn.parked.lock().unwrap_or_else(|e| e.into_inner());
            if !turn.outbound.load(Ordering::Acquire) && !stop() {
                let _g = turn.wake_outbound.wait(g);
            }
            light = 0;
            last_packet = Instant::now();
            continue;
        }
        // A rate limit holding packets back wakes it when they are due.
        let now = Instant::now();
        let timeout = shared
            .tunnel()
            .next_send_release(now)
            .map_or(HANDBACK_IDLE, |at| {
                at.saturating_duration_since(now).min(HANDBACK_IDLE)
            });
        let ready = dev
            .wait_readable(timeout)
            .map_err(|e| DevError::Runtime(format!("{}: {e}", dev.name())))?;
        let mut read = 0;
        let now = {
            let mut h = half.lock().unwrap_or_else(|e| e.into_inner());
            let DeviceHalf(ob, out) = &mut *h;
            let now = Instant::now();
            if ready {
                read = ob.read_device(shared, out, now, clock.at(now))?;
                out.flush(now);
            }
            // What the packets just read set going (a handshake when a
            // session is due for renewal) and what a rate limit held back
            // leave now, not when the network thread next wakes.
            out.transmit(shared, now);
            now
        };
        if read > 0 {
            last_packet = now;
        }
        if ready {
            light = if read <= 1 { light + 1 } else { 0 };
        }
        if now.saturating_duration_since(last_packet) >= HANDBACK_IDLE
            || light >= LIGHT_WAKES
            || !turn.net_busy(now)
        {
            light = 0;
            turn.to_inbound(&shared.counters);
        }
    }
    Ok(())
}

/// Sets the flag and wakes the other packet thread when dropped, also
/// while unwinding from a panic: it then stops instead of sleeping forever.
struct StopOnDrop<'a>(&'a AtomicBool, &'a dyn Fn());

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        (self.1)();
    }
}

/// The device-to-network half with its own outbox: the outbound thread's
/// while it has the device, the network thread's otherwise (see [`Turn`]).
struct DeviceHalf<'a>(Outbound<'a>, Outbox<'a>);

/// The device half and whose turn it is, with a thread per direction.
struct Shifts<'s, 'a> {
    half: &'s Mutex<DeviceHalf<'a>>,
    turn: &'s Turn,
    dev: &'s TunDevice,
}

/// Where the inbound loop's descriptors are in its poll set.
#[derive(Default)]
struct Positions {
    /// The device, when this thread alone moves both directions (TCP, or
    /// one thread for both).
    dev: Option<usize>,
    /// The device shared with the outbound thread (see [`Turn`]).
    shift_dev: Option<usize>,
    /// The control link's bell, unless it interrupts the wait instead.
    control: Option<usize>,
    udp: Option<usize>,
    /// The socket connected to a lone peer (left out while it is off).
    connected: Option<usize>,
    /// The timers' deadline, when the kernel keeps it.
    deadline: Option<usize>,
}

/// The network-to-device direction, the control requests and the timers;
/// with `ob`, the device-to-network direction too (TCP: one thread).
fn inbound_loop(
    ib: &mut Inbound,
    mut ob: Option<&mut Outbound>,
    shifts: Option<Shifts>,
    shared: &Shared,
    out: &mut Outbox,
    ctl: &Control,
    stop: &dyn Fn() -> bool,
) -> Result<(), DevError> {
    let mut clock = WallClock::new();
    let mut timers = Timers::new(ctl);
    let mut rx = Batch::new(BATCH, SLOT);
    // Over UDP the loop waits on the device and the socket alone, with
    // `poll(2)`: the control link's bell and the timers' deadline come as
    // a signal to this thread (see `tapir_sys::interrupt`: an epoll set
    // with descriptors for them cost a ping 0.8 µs more, pinned). Over TCP,
    // with its many connections, the set is kept by the kernel (epoll),
    // built again when its connections change (see below).
    let mut set = match &out.link {
        Link::Udp(_) => PollSet::interruptible().unwrap_or_else(|_| PollSet::kept()),
        Link::Tcp(_) => PollSet::kept(),
    };
    let listening = if set.is_interruptible() {
        ctl.link.wake.interrupts_this_thread().ok()
    } else {
        None
    };
    if listening.is_none() && set.is_interruptible() {
        set = PollSet::kept();
    }
    // While the connected socket is on, the tunnel's own socket hears
    // little (handshakes from elsewhere, a peer that roamed): it is left
    // out of the wait, one descriptor fewer for the kernel to look at
    // each time (0.2 µs a ping, pinned), and what comes to it interrupts
    // the wait as the bell does (a signal to this thread: see
    // `tapir_sys::interrupt::on_arrival`). Then it is looked at after a
    // signal, and again after a receive that found something, until it
    // is empty.
    let this_tid = listening
        .as_ref()
        .and_then(|_| tapir_sys::interrupt::this_thread().ok());
    let mut main_quiet = false;
    let mut look_at_main = false;
    // Served before the connected socket at the next turn; busy, and in
    // the wait until then.
    let mut main_next = false;
    let mut main_calm_at: Option<Instant> = None;
    let mut signals_seen = tapir_sys::interrupt::count();
    // The bell's rings last looked at (with `listening`).
    let mut rings_seen = 0;
    // The timers' deadline is kept by the kernel too, and the loop waits
    // without a timeout: a timer that interrupts the thread, or, with a
    // kept set, one in the set (see `Deadline`).
    let mut alarm = listening
        .as_ref()
        .and_then(|_| tapir_sys::interrupt::Alarm::new().ok());
    let mut deadline = if set.is_kept() {
        Deadline::new().ok()
    } else {
        None
    };
    let mut next_timer = Instant::now();
    // Packets, requests or news since the timers last ran, and the sends
    // counted then: they run again within a second of what armed new
    // timers, and otherwise sleep until the next one (see `TIMERS_AFTER`).
    let mut active = true;
    let mut sent_seen = 0;
    let mut dials_at = None;
    // TCP's own next deadline, as the last wait was set for.
    let mut tcp_due = None;
    let mut served = Served {
        fwmark: ctl.fwmark,
        port: ctl.port,
        showing: None,
    };
    // The time read after the last poll: what the loop did since took
    // microseconds (a batch, a millisecond), its timers are kept in
    // milliseconds and are never early for it.
    let mut now = Instant::now();
    let mut release_at = shared.tunnel().next_release(now);
    let mut at = Positions::default();
    // Writes to the device in a row after which it had nothing to read;
    // receives in a row that found one datagram.
    let mut no_answer = 0u32;
    // (Each UDP socket's own: the tunnel's, and the connected one.)
    let mut lone_ins = [0u32; 2];
    let mut lone_modes: [LoneMode; 2] = Default::default();
    // Where the connected socket is connected, while it is on (see
    // `connected`).
    let mut connected_to = None;
    while !stop() {
        // TCP: keep a connection to every configured endpoint.
        if let Link::Tcp(t) = &mut out.link {
            tcp_dial(t, shared, &mut dials_at, now);
        }
        // The descriptors to wait on, put in the set once; then only the
        // device's entry is left out or put back, and over TCP the
        // connections that came, went or wait for something else (writing,
        // a connect) go in or out one at a time (`TcpTransport::sync`).
        if set.is_empty() {
            at = Positions::fill(
                &mut set,
                ob.as_deref().map(|o| o.dev),
                shifts.as_ref().map(|sh| sh.dev),
                ctl,
                &out.link,
                shared.connected.as_ref(),
                deadline.as_ref(),
            );
            if let Link::Tcp(t) = &mut out.link {
                t.forget_places();
            }
        }
        let shift_dev_at = match (&shifts, at.shift_dev) {
            (Some(sh), Some(i)) => {
                let theirs = sh.turn.outbound.load(Ordering::Acquire);
                set.set_ignored(i, theirs);
                (!theirs).then_some(i)
            }
            _ => None,
        };
        let (dev_at, control_at, udp_at) = (at.dev, at.control, at.udp);
        if let Some(i) = at.connected {
            set.set_ignored(i, connected_to.is_none());
        }
        if let (Link::Udp(main), Some(i)) = (&out.link, udp_at) {
            let quiet = connected_to.is_some()
                && this_tid.is_some()
                && main_calm_at.is_none_or(|at| now >= at);
            if quiet != main_quiet {
                // (Where the kernel refuses, the socket stays in the wait.)
                let tid = this_tid.filter(|_| quiet);
                main_quiet = tapir_sys::interrupt::on_arrival(main.as_fd(), tid).is_ok() && quiet;
                // What came before it was told to interrupt.
                look_at_main |= main_quiet;
            }
            set.set_ignored(i, main_quiet);
        }
        // (Back in the wait, it is looked at there.)
        look_at_main &= main_quiet;
        if active || shared.counters.sends() != sent_seen {
            active = true;
            next_timer = next_timer.min(now + TIMERS_AFTER);
        }
        // A rate limit holding packets back wakes the loop when they are due.
        let due = release_at.map_or(next_timer, |at| at.min(next_timer));
        let mut timeout = FOREVER;
        if alarm.as_mut().is_some_and(|a| a.ensure(due, now).is_err()) {
            alarm = None;
        }
        if let Some(d) = deadline.as_mut() {
            if d.ensure(due, now).is_err() {
                // Not set: out of the set, and the wait's timeout stands in for it.
                deadline = None;
                if let Some(i) = at.deadline {
                    set.set_ignored(i, true);
                }
            }
        }
        if deadline.is_none() && alarm.is_none() {
            timeout = due.saturating_duration_since(now);
        }
        if served.showing.is_some() || (listening.is_some() && ctl.link.wake.rings() != rings_seen)
        {
            // A status's next slice after a look at the packets; or rings
            // not yet looked at (made before this thread listened, which
            // interrupted nothing).
            timeout = Duration::ZERO;
        }
        if look_at_main {
            // (The tunnel's socket, out of the wait, may hold more.)
            timeout = Duration::ZERO;
        }
        if let Link::Tcp(t) = &mut out.link {
            (timeout, tcp_due) = tcp_register(t, &mut set, now, timeout);
        }
        set.wait(timeout)
            .map_err(|e| DevError::Runtime(format!("poll: {e}")))?;
        now = Instant::now();
        if main_quiet {
            let signals = tapir_sys::interrupt::count();
            if signals != signals_seen {
                (signals_seen, look_at_main) = (signals, true);
            }
        }
        let wall_now = clock.at(now);
        if let (Some(d), Some(i)) = (deadline.as_mut(), at.deadline) {
            if set.readable(i) {
                d.fired();
            }
        }
        if let (Some(ob), Some(at)) = (ob.as_deref_mut(), dev_at) {
            if set.readable(at) {
                active = true;
                ob.read_device(shared, out, now, wall_now)?;
                out.flush(now);
            }
        }
        if let Some(sh) = &shifts {
            if shift_dev_at.is_some_and(|at| set.readable(at)) {
                active = true;
                let mut h = sh.half.lock().unwrap_or_else(|e| e.into_inner());
                let DeviceHalf(ob, o) = &mut *h;
                let read = ob.read_device(shared, o, now, wall_now)?;
                o.flush(now);
                if read >= BURST && sh.turn.net_busy(now) {
                    sh.turn.to_outbound(&shared.counters);
                }
            }
        }
        // A lone datagram received by `recv_one`: in slot 0, its length
        // and sender here rather than in the batch's records.
        let mut lone = None;
        // From the connected socket first: the peer's datagrams come there
        // (what waits on the other is seen at the next wait, at once).
        let connected_ready = at
            .connected
            .is_some_and(|i| connected_to.is_some() && set.readable(i));
        let main_ready = udp_at.is_some_and(|i| set.readable(i))
            || (main_quiet && std::mem::take(&mut look_at_main));
        // Both ready: the connected socket first, the tunnel's the next
        // turn (which does not sleep), whatever is ready then.
        let from_connected = connected_ready && !(main_ready && main_next);
        main_next = connected_ready && main_ready && from_connected;
        look_at_main |= main_next && main_quiet;
        let got = match &mut out.link {
            Link::Udp(main) if from_connected || main_ready => {
                let (s, k) = match shared.connected.as_ref().filter(|_| from_connected) {
                    Some(c) => (c.fd(), 1),
                    None => (main.as_fd(), 0),
                };
                // An error on the connected socket is an ICMP answer to
                // what went to the peer (refused, unreachable): nothing
                // to receive, as on the tunnel's own socket, which hears
                // none of them.
                let failed = |e: io::Error| {
                    if k == 1 {
                        Ok(0)
                    } else {
                        Err(DevError::Runtime(format!("UDP receive: {e}")))
                    }
                };
                let (lone_in, lone_mode) = (&mut lone_ins[k], &mut lone_modes[k]);
                let gro = shared.counters.gro_udp.load(Ordering::Relaxed);
                let fits = LoneMode::fits(*lone_in, out.sticky);
                if lone_mode.on && !fits {
                    lone_mode.leave(s, gro, &shared.counters);
                } else if !lone_mode.on && fits && habitual(*lone_in) {
                    lone_mode.enter(s, gro, &shared.counters, now);
                }
                // Where receives keep finding one datagram, the kernel is
                // not asked to look for a second (see `habitual`), and the
                // batch's headers are left alone.
                let got = if let Some(until) = lone_mode.suspect_until {
                    let got = rx.recv_up_to(s, BATCH).or_else(failed)?;
                    for i in 0..got {
                        if let Some(size) = messages::coalesced_size(rx.datagram_mut(i).0) {
                            rx.set_segment_size(i, size);
                        }
                    }
                    if got < BATCH && now >= until {
                        lone_mode.suspect_until = None;
                    }
                    got
                } else if habitual(*lone_in) {
                    let one = if let (true, Some(to)) = (lone_mode.on && k == 1, connected_to) {
                        rx.recv_connected(s, to)
                    } else if lone_mode.on {
                        rx.recv_plain(s)
                    } else {
                        rx.recv_one(s)
                    };
                    match one {
                        Ok(None) => 0,
                        Ok(Some(one)) if one.segment.is_none() => {
                            lone = Some((one.len, (from_v6(SocketAddr::V6(one.from)), one.local)));
                            1
                        }
                        Ok(Some(one)) => {
                            rx.set_received_one(&one);
                            1
                        }
                        Err(e) => failed(e)?,
                    }
                } else {
                    rx.recv_up_to(s, BATCH).or_else(failed)?
                };
                // (One the kernel coalesced is a batch: not lone.)
                match got {
                    0 => {}
                    1 if lone.is_some() || rx.segment_size(0).is_none() => {
                        *lone_in = lone_in.wrapping_add(1)
                    }
                    _ => *lone_in = 0,
                }
                if lone_mode.on && *lone_in == 0 {
                    lone_mode.leave(s, gro, &shared.counters);
                }
                // Out of the wait, it is looked at again until empty; one
                // that brings batches (a flood, the other family's
                // traffic) goes back in the wait for a while, where a
                // batch costs a wake-up, not a signal a datagram.
                look_at_main |= k == 0 && main_quiet && got > 0;
                if k == 0 && main_quiet && got >= MAIN_BUSY {
                    main_calm_at = Some(now + MAIN_BUSY_FOR);
                }
                got
            }
            Link::Udp(_) => 0,
            Link::Tcp(t) => {
                t.service(&set, now);
                t.receive(&mut rx, now)
            }
        };
        if got > 0 {
            active = true;
            // What is written to the device often has an answer at once (a
            // ping's reply, a TCP ACK), waiting there when the write
            // returns: when the device half is free, this thread holds it
            // across the write and sends the answer itself, rather than
            // after a round through poll or a wake-up of the other thread.
            // A busy network side (a batch of 64 KiB or more) is noted for
            // the hand-over (see `Turn`). The half is still taken here when
            // it is free, whoever's turn it is: on the 2-core development
            // machine that measured faster (single stream, three runs of
            // three: 4.18-4.59 Gbit/s, against 3.63-4.30 when only the
            // outbound thread reads during its turn).
            if let Some(sh) = shifts.as_ref().filter(|_| lone.is_none()) {
                if (0..got).map(|i| rx.slot_with_len(i).1).sum::<usize>() >= NET_BUSY_BYTES {
                    sh.turn.mark_net_busy(now);
                }
            }
            // (Left out where it keeps finding nothing: see `habitual`.)
            let answers = !habitual(no_answer);
            if !answers {
                no_answer = no_answer.wrapping_add(1);
            }
            let mut steal = shifts
                .as_ref()
                .filter(|_| answers)
                .and_then(|sh| sh.half.try_lock().ok());
            match lone {
                Some((len, from)) => {
                    ib.open_lone(shared, rx.slot_mut(0), len, from, out, now, wall_now)
                }
                None => ib.open_received(shared, &mut rx, got, out, now, wall_now),
            }
            out.flush(now);
            let mut answered = None;
            if let Some(h) = steal.as_deref_mut() {
                let DeviceHalf(ob, o) = h;
                answered = Some(ob.read_device(shared, o, now, wall_now)?);
                o.flush(now);
            }
            drop(steal);
            // One thread for both: the same, without a round through poll.
            if let Some(ob) = ob.as_deref_mut().filter(|_| answers) {
                answered = Some(ob.read_device(shared, out, now, wall_now)?);
                out.flush(now);
            }
            match answered {
                Some(0) => no_answer = no_answer.wrapping_add(1),
                Some(_) => no_answer = 0,
                None => {}
            }
        }
        let news = match control_at {
            Some(i) => {
                let rung = set.readable(i);
                if rung {
                    ctl.link.wake.drain();
                }
                rung
            }
            None => {
                let rings = ctl.link.wake.rings();
                rings != std::mem::replace(&mut rings_seen, rings)
            }
        };
        // The connected socket is looked at after news and after the
        // timers (made again where `Some(true)`).
        let mut steer = None;
        if news || served.showing.is_some() {
            active = true;
            // (The host watcher rings this bell too.)
            timers.take_host(shared, ctl, out, now);
            let mark = served.fwmark;
            let moved = serve_control(ctl, shared, out, ib, &mut timers, &mut served);
            if moved {
                // The socket is another under the same descriptor: the set
                // is built again (see `move_udp`), and the new socket
                // receives as a new one does.
                set.clear();
                (lone_ins[0], lone_modes[0]) = (0, LoneMode::default());
                // (Without O_ASYNC: set again below, if it is to be.)
                main_quiet = false;
            }
            // A peer added or taken away, an endpoint set, a new port or mark.
            steer = Some(moved || mark != served.fwmark);
        }
        if let Link::Tcp(t) = &mut out.link {
            tcp_after_wait(t, shared, ib, now, wall_now, tcp_due);
        }
        let timed = now >= next_timer;
        if timed {
            // (They see what came before them this turn; what comes after
            // is news for the next.)
            next_timer = timers.run(shared, ctl, ib, out, now, wall_now);
            // Over TCP the connections' own timers keep the second.
            active = matches!(out.link, Link::Tcp(_));
            // A peer that roamed, a send that found its address gone.
            steer = Some(steer.unwrap_or(false));
        }
        if let Some(renew) = steer {
            connected_to = steer_connected(
                shared,
                (out, ib, &mut rx),
                renew,
                served.fwmark,
                &mut set,
                (&mut lone_ins, &mut lone_modes),
                (now, wall_now),
            );
        }
        // The loop's tail under one lock: packets a rate limit released,
        // what waits to go out, and when a rate limit next releases (for
        // the next wait).
        release_at = {
            let mut t = shared.tunnel();
            ib.release_held(&mut t, out, now, wall_now);
            out.queue_transmit(&mut t, now);
            // What the device half's outbox could not send, while the
            // outbound thread (which settles it otherwise) is parked.
            if let Some(Ok(mut h)) = shifts.as_ref().map(|sh| sh.half.try_lock()) {
                if !h.1.unsent.is_empty() {
                    h.1.settle_unsent(&mut t);
                }
            }
            // What the timers queued leaves below, with what waited for
            // a handshake they completed: the timers that sets going
            // (a rehandshake if data goes unanswered) are taken in here,
            // and those sends are not news for the next wait.
            if timed {
                if let Some(d) = t.next_deadline(now) {
                    next_timer = next_timer.min(d);
                }
            }
            t.next_release(now)
        };
        ib.flush_gro();
        out.flush(now);
        if !out.unsent.is_empty() {
            out.settle_unsent(&mut shared.tunnel());
        }
        if timed {
            sent_seen = shared.counters.sends();
        }
    }
    Ok(())
}

/// Turns the connected socket on, moves it, or off, as the tunnel now
/// stands (see [`connected`]), made afresh if `renew` (a new port or
/// `mark`), or if its local address is no longer the host's; where it is
/// connected, if on. What waits in a socket about to be made again for
/// the same endpoint, or to go off, is received and opened first (`out`,
/// `ib`, `rx`, at `now`). A socket made
/// afresh receives as a new one does (`lone`: each UDP socket's counts and
/// modes), and is put in the wait again (`set`: an epoll set holds the
/// socket a descriptor named, not the descriptor).
#[inline(never)]
fn steer_connected(
    shared: &Shared,
    (out, ib, rx): (&mut Outbox, &mut Inbound, &mut Batch),
    renew: bool,
    mark: u32,
    set: &mut PollSet,
    (lone_ins, lone_modes): (&mut [u32; 2], &mut [LoneMode; 2]),
    (now, wall): (Instant, Duration),
) -> Option<SocketAddrV6> {
    let (Some(c), Link::Udp(_)) = (&shared.connected, &out.link) else {
        return None;
    };
    // With several local addresses, answers leave from where each peer
    // wrote to: not the connected socket's business.
    let to = if out.sticky == Some(false) {
        let t = shared.tunnel();
        match t.peer_count() {
            1 => t.peers().next().and_then(|(_, e, _)| e).map(to_v6),
            _ => None,
        }
    } else {
        None
    };
    // Its address gone from the host (one that was listed when it was
    // made: the host watcher lists global ones only), or a send that
    // found it so.
    let gone = c.local().is_some_and(|l| {
        c.listed() && !out.host_addresses.is_empty() && !out.host_addresses.contains(&l)
    });
    let renew = renew || gone || c.take_stale();
    // What waits in it would go with it: received first, where it is made
    // again for the same peer or goes off. (Not where the peer moved:
    // what came from where it was would move it back.)
    let now_to = c.to();
    if now_to.is_some() && (to.is_none() || (to == now_to && renew)) {
        for _ in 0..DRAIN_BATCHES {
            let got = match rx.recv_up_to(c.fd(), BATCH) {
                Ok(0) => break,
                Ok(n) => n,
                // An ICMP answer's error comes before what waits (and is
                // cleared by coming).
                Err(_) => continue,
            };
            // (GRO may be off, what waited coalesced: see `LoneMode`.)
            for i in 0..got {
                if let Some(size) = messages::coalesced_size(rx.datagram_mut(i).0) {
                    rx.set_segment_size(i, size);
                }
            }
            ib.open_received(shared, rx, got, out, now, wall);
            out.flush(now);
        }
    }
    let Link::Udp(main) = &out.link else {
        return None;
    };
    let version = c.version();
    let gro = shared.counters.gro_udp.load(Ordering::Relaxed);
    // (Not made: off, counted, and tried again at the next look.)
    let _ = c.steer(main, to, renew, mark, gro);
    if c.version() != version {
        (lone_ins[1], lone_modes[1]) = (0, LoneMode::default());
        set.clear();
        let listed = c.local().is_some_and(|l| out.host_addresses.contains(&l));
        c.set_listed(listed);
    }
    c.to()
}

/// A receive from the tunnel's socket, out of the wait, that brings this
/// many datagrams puts it back in the wait for [`MAIN_BUSY_FOR`].
const MAIN_BUSY: usize = 8;
const MAIN_BUSY_FOR: Duration = Duration::from_secs(1);

/// At most this many batches are received from a connected socket about
/// to be replaced (its queue holds 4 MiB: a few batches of coalesced
/// datagrams, a few hundred of single ones).
const DRAIN_BATCHES: usize = 256;

impl Positions {
    /// Empties `set` and puts the loop's descriptors in it.
    #[inline(never)]
    fn fill(
        set: &mut PollSet,
        dev: Option<&TunDevice>,
        shift_dev: Option<&TunDevice>,
        ctl: &Control,
        link: &Link,
        connected: Option<&Connected>,
        deadline: Option<&Deadline>,
    ) -> Self {
        set.clear();
        Positions {
            dev: dev.map(|d| set.add(d.as_fd(), true, false)),
            // With a thread per direction: the device too while it is
            // this thread's turn (the outbound thread's word that it is
            // again comes on the control link's bell, which it shares).
            shift_dev: shift_dev.map(|d| set.add(d.as_fd(), true, false)),
            control: (!set.is_interruptible()).then(|| set.add(ctl.link.wake.fd(), true, false)),
            udp: match link {
                Link::Udp(s) => Some(set.add(s.as_fd(), true, false)),
                Link::Tcp(_) => None,
            },
            connected: connected.map(|c| set.add(c.fd(), true, false)),
            deadline: deadline.map(|d| set.add(d.fd(), true, false)),
        }
    }
}

/// After packets, requests or news, the timers run again within this: the
/// timers those armed are 5 s or more out (but a keepalive turned on, due
/// at once), and a second's delay lets a busy tunnel walk its peers once a
/// second, not once a packet. With nothing since, they sleep until their
/// next deadline (an idle tunnel woke once a second for nothing).
const TIMERS_AFTER: Duration = Duration::from_secs(1);
/// The timers look at least this often all the same: a bound on how late
/// a timer armed where nothing wakes the loop would be (none is known), and
/// on a host name's look-up after the machine slept (the monotonic clock
/// stood still while the wall clock ran).
const IDLE_LOOK: Duration = Duration::from_secs(60);

/// TCP: dials every configured endpoint not connected, once a second.
#[inline(never)]
fn tcp_dial(t: &mut TcpTransport, shared: &Shared, dials_at: &mut Option<Instant>, now: Instant) {
    if dials_at
        .is_none_or(|at: Instant| now.saturating_duration_since(at) >= Duration::from_secs(1))
    {
        *dials_at = Some(now);
        let wanted: Vec<SocketAddr> = shared
            .tunnel()
            .peers()
            .filter_map(|(c, _, _)| c.endpoint)
            .collect();
        t.set_dials(&wanted, now);
    }
}

/// TCP: its connections into `set` as they now are (what changed
/// only); the wait's timeout, cut to its own next deadline (and to
/// none when input is buffered), and that deadline (for
/// [`tcp_after_wait`]: what the turn changes is seen by the next).
#[inline(never)]
fn tcp_register(
    t: &mut TcpTransport,
    set: &mut PollSet,
    now: Instant,
    timeout: Duration,
) -> (Duration, Option<Instant>) {
    t.sync(set, now);
    let due = t.next_deadline(now);
    if t.has_input() {
        return (Duration::ZERO, due);
    }
    let timeout = due.map_or(timeout, |at| timeout.min(at.saturating_duration_since(now)));
    (timeout, due)
}

/// TCP after a wait: its own deadlines (backoff over, connect or
/// handshake timed out), as soon as one has passed; a handshake at once
/// over a connection (re)opened.
#[inline(never)]
fn tcp_after_wait(
    t: &mut TcpTransport,
    shared: &Shared,
    ib: &mut Inbound,
    now: Instant,
    wall_now: Duration,
    due: Option<Instant>,
) {
    if due.is_some_and(|at| at <= now) {
        t.handle_timeout(now);
    }
    for addr in t.take_connected() {
        shared
            .tunnel()
            .path_opened(now, wall_now, &mut ib.rng, addr);
    }
    for line in t.events.drain(..) {
        eprintln!("tapir: {}: {line}", ib.name);
    }
}

/// The control requests the control thread read whole, answered from
/// memory (never waiting on a client). Out of line, as what follows is:
/// the packet loop's code and stack stay those of its packets (see
/// [`inbound_loop`]).
#[cold]
#[inline(never)]
/// Serves what the control thread passed on; `true` if the socket moved
/// to another port (the poll set must take it again).
fn serve_control(
    ctl: &Control,
    shared: &Shared,
    out: &mut Outbox,
    ib: &Inbound,
    timers: &mut Timers,
    served: &mut Served,
) -> bool {
    let Served {
        fwmark,
        port,
        showing,
    } = served;
    let mut moved = false;
    // A status being answered goes on first; the requests after it wait
    // for it (a change between its slices would tear it).
    if let Some(job) = showing.as_mut() {
        let t = shared.tunnel();
        if !job.slice(&t, shared, &out.link, ctl.mode, ib.gro_on) {
            return false;
        }
        *showing = None;
    }
    // Requests read whole by the control thread: answered from
    // memory, never waiting on a client.
    while let Ok(m) = ctl.link.messages.try_recv() {
        let mut t = shared.tunnel();
        match m {
            control::Message::Request(_, reply, taken) if !taken.take() => {
                // The client was told it timed out: do not act on it now.
                let _ = reply.send("errno=110\n\n".into());
            }
            control::Message::Request(
                request @ (crate::uapi::Request::Get | crate::uapi::Request::TapirGet),
                reply,
                _,
            ) => {
                let tapir = matches!(request, crate::uapi::Request::TapirGet);
                let mut job = Showing::new(&t, reply, tapir, *port, *fwmark);
                if !job.slice(&t, shared, &out.link, ctl.mode, ib.gro_on) {
                    *showing = Some(job);
                    return moved;
                }
            }
            control::Message::Request(request, reply, _) => {
                // Endpoints given: their host names are not looked up again.
                let given: Vec<PublicKey> = match &request {
                    crate::uapi::Request::Set(r) => r.endpoints_given().collect(),
                    crate::uapi::Request::Apply(r) => {
                        timers.reload_lookups(&r.host_names);
                        Vec::new()
                    }
                    _ => Vec::new(),
                };
                let udp = match &out.link {
                    Link::Udp(s) => Some(*s),
                    Link::Tcp(_) => None,
                };
                let (listen_port, mark_now) = (*port, *fwmark);
                let gro = shared.counters.gro_udp.load(Ordering::Relaxed);
                let mut rebind = |p: u16| {
                    // (Over TCP: tapir down/up; said here too, where wg
                    // prints only "Operation not supported".)
                    let Some(s) = udp else {
                        eprintln!(
                            "tapir: {}: port {p} refused: over TCP the listener does not move (tapir down, then up with the new ListenPort)",
                            ib.name
                        );
                        return Err(libc::EOPNOTSUPP);
                    };
                    let p = move_udp(s, p, mark_now, gro).map_err(|e| {
                        eprintln!("tapir: {}: moving to UDP port {p}: {e}", ib.name);
                        e.raw_os_error().unwrap_or(libc::EIO)
                    })?;
                    eprintln!("tapir: {}: now listening on UDP port {p}", ib.name);
                    (*port, moved) = (p, true);
                    Ok(())
                };
                let mut mark = |m: u32| match &mut out.link {
                    Link::Udp(s) => socket2::SockRef::from(*s).set_mark(m),
                    Link::Tcp(tcp) => tcp.set_mark(m),
                };
                let answer = crate::uapi::answer(
                    request,
                    &mut t,
                    crate::uapi::Interface {
                        listen_port,
                        rebind: &mut rebind,
                        fwmark,
                        mark: &mut mark,
                    },
                );
                if answer == "errno=0\n\n" {
                    for k in &given {
                        timers.pin(k);
                    }
                }
                let _ = reply.send(answer);
            }
            control::Message::Resolved(key, addr) if timers.looks_up(&key) => {
                t.update_peer(&key, |c| c.endpoint = Some(addr));
            }
            control::Message::Resolved(..) => {}
        }
    }
    moved
}

/// What the control requests change, or leave for the next turn.
struct Served {
    /// The mark on the tunnel's sockets (0: none).
    fwmark: u32,
    /// The UDP port (`wg set NAME listen-port`).
    port: u16,
    /// A status being answered a slice at a time.
    showing: Option<Showing>,
}

/// Peers a slice of a status reply takes at most: 10,000 peers took a
/// `wg show` 3.7 ms and a `tapir status` 7-9 ms, which held the packet
/// thread as long; a slice holds it about 0.1 ms.
const SHOW_SLICE: usize = 128;
/// And bytes (a tap peer's status has a line for each of up to 64 MACs).
const SHOW_SLICE_BYTES: usize = 32 * 1024;

/// A `wg show` (`get=1`) or a `tapir status` (`tapir-get=1`) being
/// answered a slice of peers at a time, with packets between (see
/// [`SHOW_SLICE`]). The requests after it wait until it is sent, so the
/// peers cannot change under it; their counters may move between slices,
/// as they would between two requests.
struct Showing {
    reply: mpsc::Sender<String>,
    /// The reply so far (it may hold keys: wiped as it grows, and if it is
    /// never sent).
    out: String,
    /// `tapir status`: WireGuard's lines without keys, then tapir's own.
    tapir: bool,
    /// In tapir's own lines (`tapir`), past WireGuard's.
    own_lines: bool,
    /// The next peer (by index).
    next: usize,
    /// The reply went.
    sent: bool,
}

impl Showing {
    fn new(t: &Tunnel, reply: mpsc::Sender<String>, tapir: bool, port: u16, fwmark: u32) -> Self {
        Self {
            reply,
            out: crate::uapi::get_head(Some(t.private_key()), port, fwmark, !tapir),
            tapir,
            own_lines: false,
            next: 0,
            sent: false,
        }
    }

    /// Adds the next slice; `true` when the reply is whole and sent.
    fn slice(
        &mut self,
        t: &Tunnel,
        shared: &Shared,
        link: &Link,
        mode: Mode,
        gro_on: bool,
    ) -> bool {
        let (end, grown) = ((self.next + SHOW_SLICE).min(t.peer_count()), self.out.len());
        while self.next < end && self.out.len() - grown < SHOW_SLICE_BYTES {
            let one = self.next..self.next + 1;
            if self.own_lines {
                extras_peers(&mut self.out, t, link, mode == Mode::Tap, one);
            } else {
                crate::uapi::get_peers(&mut self.out, t, one, !self.tapir);
            }
            self.next += 1;
        }
        if self.next < t.peer_count() {
            return false;
        }
        if self.tapir && !self.own_lines {
            let (c, k) = (&shared.counters, shared.connected.as_ref());
            self.out.push_str(&extras_head(t, c, link, k, mode, gro_on));
            (self.own_lines, self.next) = (true, 0);
            return false;
        }
        crate::uapi::push_end(&mut self.out);
        let _ = self.reply.send(std::mem::take(&mut self.out));
        self.sent = true;
        true
    }
}

impl Drop for Showing {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.out);
        if !self.sent {
            // The tunnel stopped before the reply was whole.
            let _ = self.reply.send(format!("errno={}\n\n", libc::EIO));
        }
    }
}

/// The network thread's timers besides the protocol's: host names looked
/// up again, a peer in the other mode named once.
struct Timers {
    started: Duration,
    /// The version of the host watcher's facts last taken (see [`host`]).
    host_seen: u64,
    /// Peers whose endpoint is a host name, looked up again while they
    /// are unreachable, and when each was last looked up.
    lookups: HashMap<PublicKey, (String, Option<Instant>)>,
    /// Peers named for sending the other mode's packets, and how many then.
    warned_layer: Vec<(PublicKey, u64)>,
}

impl Timers {
    fn new(ctl: &Control) -> Self {
        Self {
            started: wall(),
            host_seen: 0,
            lookups: ctl
                .hostnames
                .iter()
                .map(|(k, h)| (*k, (h.clone(), None)))
                .collect(),
            warned_layer: Vec::new(),
        }
    }

    /// What the host watcher saw change (its own thread looks, and rings
    /// the control link's bell when something did).
    fn take_host(&mut self, shared: &Shared, ctl: &Control, out: &mut Outbox, now: Instant) {
        let Some(seen) = ctl.host.take(&mut self.host_seen) else {
            return;
        };
        out.take_host(&seen, now);
        if let Some(m) = seen.mtu {
            shared.tunnel().set_mtu(m);
        }
    }

    /// A reload's host names: new ones looked up as due, one no longer
    /// there (an address now, or the peer gone) not any more.
    fn reload_lookups(&mut self, names: &[(PublicKey, String)]) {
        let old = std::mem::take(&mut self.lookups);
        self.lookups = names
            .iter()
            .map(|(k, h)| {
                let looked = old.get(k).filter(|(oh, _)| oh == h).and_then(|(_, l)| *l);
                (*k, (h.clone(), looked))
            })
            .collect();
    }

    /// Peer `key`'s endpoint was given (`wg set ... endpoint`): its host
    /// name is no longer looked up (a later answer would undo the user's
    /// choice, where wireguard-go and wg-quick look a name up once).
    fn pin(&mut self, key: &PublicKey) {
        self.lookups.remove(key);
    }

    /// Whether an answer for `key`'s host name is still wanted.
    fn looks_up(&self, key: &PublicKey) -> bool {
        self.lookups.contains_key(key)
    }

    /// Runs what is due; returns when to run again.
    #[cold]
    #[inline(never)]
    fn run(
        &mut self,
        shared: &Shared,
        ctl: &Control,
        ib: &mut Inbound,
        out: &mut Outbox,
        now: Instant,
        wall_now: Duration,
    ) -> Instant {
        self.take_host(shared, ctl, out, now);
        let mut t = shared.tunnel();
        // Endpoints given as host names are looked up again when the
        // peer has been unreachable for a while (it may have moved).
        // (Each found by its key: a walk for each of 10,000 host names took
        // most of the packet thread's time.)
        let mut lookup_at: Option<Instant> = None;
        for (key, (host, looked)) in &mut self.lookups {
            let last = t
                .peer_index(key)
                .and_then(|p| t.peer_stats(p))
                .and_then(|s| s.last_handshake);
            if reresolve_due(last, wall_now, self.started, *looked, now) {
                *looked = Some(now);
                // Looked up on the control thread; the answer comes back as a message.
                ctl.link.resolve(*key, host.clone());
            }
            let at = reresolve_at(last, wall_now, self.started, *looked, now);
            lookup_at = Some(lookup_at.map_or(at, |l| l.min(at)));
        }
        // A peer in the other mode is named once, not per packet.
        for (c, _, s) in t.peers() {
            let seen = self.warned_layer.iter().any(|(k, _)| *k == c.public);
            if s.drops.wrong_layer > 0 && !seen {
                eprintln!(
                    "tapir: {}: peer {} sends {}: is it in {} mode? (dropped)",
                    ib.name,
                    c.public,
                    if ib.tap {
                        "IP packets, not Ethernet frames"
                    } else {
                        "Ethernet frames, not IP packets"
                    },
                    if ib.tap { "tun" } else { "tap" },
                );
                self.warned_layer.push((c.public, s.drops.wrong_layer));
            }
        }
        t.handle_timeout(now, wall_now, &mut ib.rng);
        // A handshake unanswered, a peer silent: answers to it leave from
        // the kernel's choice again (see `Sources`), as in the kernel's
        // WireGuard (a host whose default route moved to its other uplink
        // kept sending from the first, and never got through again).
        for to in t.take_doubtful() {
            out.forget_source(to);
        }
        // At most IDLE_LOOK away all the same (nothing armed: until traffic
        // or a change comes, which look again).
        [t.next_deadline(now), lookup_at]
            .into_iter()
            .flatten()
            .fold(now + IDLE_LOOK, Instant::min)
    }
}

impl Started {
    /// Moves packets until `shutdown`; the device goes away when this
    /// returns. Over UDP each direction has a thread of its own (device to
    /// network, network to device with the timers); over TCP one thread
    /// moves both. The control socket and host-name look-ups run on a
    /// thread of their own for as long.
    pub fn run(
        self,
        shutdown: &AtomicBool,
        reloads: &AtomicU64,
        bell: Arc<Bell>,
    ) -> Result<(), DevError> {
        let (link, end) = control::pair(Arc::clone(&bell))
            .map_err(|e| DevError::Runtime(format!("control channel: {e}")))?;
        let done = AtomicBool::new(false);
        let mut this = self;
        let control = this.control.take();
        let reloader = reload::Reloader::new(this.config.clone());
        std::thread::scope(|s| {
            let socket = control.as_ref();
            let done = &done;
            s.spawn(move || {
                let stop = || shutdown.load(Ordering::Relaxed) || done.load(Ordering::Relaxed);
                end.run(socket, reloader, reloads, &stop)
            });
            let result = this.packet_loop(shutdown, &link);
            done.store(true, Ordering::Relaxed);
            // The control thread sleeps until rung.
            bell.ring();
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
            port,
            hostnames,
            bridge,
            mut applied,
            save_to,
            config,
        } = self;
        let tap = mode == Mode::Tap;
        // Over TCP a peer's current endpoint is where its connection came
        // from, a port of the moment: SaveConfig keeps the configured one.
        let roaming_endpoints = matches!(net, Net::Udp(_));
        let counters = Counters::default();
        // UDP offloads, probed: segmentation on send, coalescing on receive.
        // TAPIR_UDP_GSO=off / TAPIR_UDP_GRO=off turn them off (to measure
        // what they bring, or to rule them out).
        if let Net::Udp(s) = &net {
            counters.gso_on.store(
                !off("TAPIR_UDP_GSO") && tapir_sys::mmsg::gso_supported(s.as_fd()),
                Ordering::Relaxed,
            );
            counters.gro_udp.store(
                !off("TAPIR_UDP_GRO") && tapir_sys::mmsg::enable_gro(s.as_fd()),
                Ordering::Relaxed,
            );
        }
        // (None where it cannot be made: the tunnel's socket does it all.)
        let connected = match &net {
            // (A tunnel run as another user cannot bind beside its socket,
            // which root made: SO_REUSEPORT wants the same owner.)
            Net::Udp(_) if !off("TAPIR_CONNECTED") && config.ops.user.is_none() => {
                Connected::new().ok()
            }
            _ => None,
        };
        let shared = Shared {
            tunnel: Mutex::new(tunnel),
            counters,
            sources: Sources::default(),
            connected,
        };
        let mut ib = Inbound::new(&dev, &name, tap, &shared.counters)?;
        // Fresh sessions with every peer we know where to find (a restart
        // is over for them once they complete), started by the timers'
        // first passes, a slice at a time, with packets between.
        shared.tunnel().handshake_all();
        // The host around the tunnel, watched on a thread of its own (see
        // `host`); looked at once before the packets.
        let host_facts = host::HostFacts::default();
        let mut watch = host::Watch::new(&name, config.bridge.as_ref(), matches!(net, Net::Tcp(_)));
        watch.look(&host_facts);
        let watch_bell =
            Bell::new().map_err(|e| DevError::Runtime(format!("a wake-up socket: {e}")))?;
        let watch_done = AtomicBool::new(false);
        let ctl = Control {
            link,
            port,
            mode,
            hostnames: &hostnames,
            fwmark: config.ops.fwmark.or(applied.mark()).unwrap_or(0),
            host: &host_facts,
        };
        let packets_wake = Arc::clone(&ctl.link.wake);
        let stopped = AtomicBool::new(false);
        let stop = || shutdown.load(Ordering::Relaxed) || stopped.load(Ordering::Relaxed);
        let result = std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("tapir-host".into())
                .spawn_scoped(s, || {
                    watch.run(
                        &host_facts,
                        &watch_bell,
                        &|| watch_done.load(Ordering::Relaxed),
                        &|| packets_wake.ring(),
                    )
                })
                .map_err(|e| DevError::Runtime(format!("a thread to watch the host: {e}")))?;
            // However the packets end (a panic too), the watcher does.
            let _watch_stop = StopOnDrop(&watch_done, &|| watch_bell.ring());
            match net {
                Net::Udp(socket) if threads_per_direction() == 1 => {
                    let mut ob = Outbound::new(&dev, &name, tap)?;
                    let mut out = Outbox::new(Link::Udp(&socket), &name, &shared);
                    inbound_loop(&mut ib, Some(&mut ob), None, &shared, &mut out, &ctl, &stop)
                }
                Net::Udp(socket) => Outbound::new(&dev, &name, tap).and_then(|ob| {
                    let half = Mutex::new(DeviceHalf(
                        ob,
                        Outbox::new(Link::Udp(&socket), &name, &shared),
                    ));
                    let turn = Turn::new(Arc::clone(&link.wake));
                    std::thread::scope(|s| {
                        let outbound = s.spawn(|| {
                            // Its end (a panic too) stops the other thread.
                            let _stop = StopOnDrop(&stopped, &|| turn.wake_inbound.ring());
                            outbound_loop(&half, &turn, &dev, &shared, &stop)
                        });
                        let mut out = Outbox::new(Link::Udp(&socket), &name, &shared);
                        // So does this one's, so that the scope can end.
                        let stop_outbound = || turn.stop_outbound();
                        let stop_guard = StopOnDrop(&stopped, &stop_outbound);
                        let r = inbound_loop(
                            &mut ib,
                            None,
                            Some(Shifts {
                                half: &half,
                                turn: &turn,
                                dev: &dev,
                            }),
                            &shared,
                            &mut out,
                            &ctl,
                            &stop,
                        );
                        drop(stop_guard);
                        let o = outbound.join().unwrap_or_else(|_| {
                            Err(DevError::Runtime(
                                "the outbound packet thread panicked".into(),
                            ))
                        });
                        r.and(o)
                    })
                }),
                Net::Tcp(mut t) => {
                    let mut ob = Outbound::new(&dev, &name, tap)?;
                    let mut out = Outbox::new(Link::Tcp(&mut t), &name, &shared);
                    inbound_loop(&mut ib, Some(&mut ob), None, &shared, &mut out, &ctl, &stop)
                }
            }
        });
        if let Some(file) = &save_to {
            match crate::saveconfig::save(file, &shared.tunnel(), roaming_endpoints) {
                Ok(()) => eprintln!(
                    "tapir: {name}: SaveConfig: peers written to {}",
                    file.display()
                ),
                Err(e) => eprintln!("tapir: {name}: SaveConfig: {e}"),
            }
        }
        applied.before_down();
        eprintln!("tapir: {name}: down");
        drop(ib);
        drop(dev);
        drop(bridge);
        applied.after_down();
        result
    }
}

/// `PREFIXkey=value` lines for the counts that are not zero.
fn put_nonzero(out: &mut String, prefix: &str, counts: &[(&str, u64)]) {
    for (k, v) in counts.iter().filter(|(_, v)| *v > 0) {
        out.push_str(&format!("{prefix}{k}={v}\n"));
    }
}

/// tapir's own status lines, after WireGuard's (see `uapi::Request::TapirGet`).
fn extras_head(
    t: &Tunnel,
    c: &Counters,
    link: &Link,
    connected: Option<&Connected>,
    mode: Mode,
    gro_on: bool,
) -> String {
    let tap = mode == Mode::Tap;
    let on = |b: bool| if b { "on" } else { "off" };
    let mut out = format!(
        "tapir_mode={mode}\ntapir_transport={}\ntapir_datapath={}{}\ntapir_device_write_errors={}\n",
        match link {
            Link::Udp(_) => "udp",
            Link::Tcp(_) => "tcp",
        },
        match (link, tap) {
            (Link::Udp(_), false) =>
                "UDP in batches of 64 (recvmmsg/sendmmsg); tun via the vnet header: TSO and checksum offload on reads, TCP segments coalesced (GRO) on writes",
            (Link::Udp(_), true) =>
                "UDP in batches of 64 (recvmmsg/sendmmsg); tap via the vnet header: TSO and checksum offload on reads, GRO on writes; a learning switch between peers",
            (Link::Tcp(_), false) =>
                "TCP, one connection per peer, 16-bit length framing; tun via the vnet header: TSO on reads, GRO on writes",
            (Link::Tcp(_), true) =>
                "TCP, one connection per peer, 16-bit length framing; tap via the vnet header, a learning switch between peers",
        },
        match link {
            Link::Udp(_) => format!(
                "; {}; UDP GSO {}, UDP GRO {}, device GRO {}",
                if threads_per_direction() == 2 {
                    "a thread per direction"
                } else {
                    "one thread for both directions"
                },
                on(c.gso_on.load(Ordering::Relaxed)),
                on(c.gro_udp.load(Ordering::Relaxed)),
                on(gro_on),
            ),
            Link::Tcp(_) => format!("; device GRO {}", on(gro_on)),
        },
        c.device_write_errors.load(Ordering::Relaxed)
    );
    if let Link::Udp(s) = link {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out += &format!(
            "tapir_udp_sent={}\ntapir_udp_send_calls={}\ntapir_udp_refused={}\ntapir_udp_blocked={}\n",
            get(&c.udp_sent),
            get(&c.udp_messages),
            get(&c.udp_refused),
            get(&c.udp_blocked)
        );
        // Datagrams the kernel dropped before tapir could receive them
        // (the socket's receive buffer full).
        // (The connected socket's too, while on: it takes the peer's.)
        let mut drops = tapir_sys::mmsg::socket_drops(s.as_fd());
        if let (Ok(n), Some(k)) = (&mut drops, connected) {
            *n += k.retired_drops.load(Ordering::Relaxed);
            if k.to().is_some() {
                *n += tapir_sys::mmsg::socket_drops(k.fd()).unwrap_or(0);
            }
        }
        if let Ok(n) = drops {
            out += &format!("tapir_udp_receive_buffer_drops={n}\n");
        }
        out += &format!("tapir_udp_lone_mode={}\n", get(&c.lone_mode));
        // The socket connected to the lone peer: on (1) or off, how many
        // times it was made, and how many times that failed.
        if let Some(k) = connected {
            out += &format!(
                "tapir_udp_connected={}\ntapir_udp_connects={}\ntapir_udp_connect_failures={}\n",
                u8::from(k.to().is_some()),
                get(&k.connects),
                get(&k.failures)
            );
        }
        if threads_per_direction() == 2 {
            out += &format!(
                "tapir_device_to_outbound_thread={}\ntapir_device_back_to_network_thread={}\n",
                get(&c.turns_out),
                get(&c.turns_back)
            );
        }
    }
    if let Link::Tcp(tcp) = link {
        let (open, pending) = tcp.connection_counts();
        out += &format!(
            "tapir_tcp_connections={open}\ntapir_tcp_unauthenticated={pending}\ntapir_tcp_accepted={}\ntapir_tcp_pending_closed={}\ntapir_tcp_bad_frames={}\ntapir_tcp_queue_full={}\ntapir_tcp_no_connection={}\ntapir_tcp_replaced={}\n",
            tcp.stats.accepted,
            tcp.stats.pending_closed,
            tcp.stats.bad_frames,
            tcp.stats.queue_full,
            tcp.stats.no_connection,
            tcp.stats.replaced
        );
    }
    // Dropped before a peer could be named.
    let u = t.unattributed();
    put_nonzero(
        &mut out,
        "tapir_",
        &[
            ("dropped_malformed", u.malformed),
            ("dropped_unknown_key", u.unknown_key),
            ("dropped_bad_handshake", u.bad_handshake),
            ("dropped_no_session", u.no_session),
            ("cookie_replies", u.cookie_replies),
        ],
    );
    out
}

/// The lines of peers `which` (by index) of tapir's own status lines,
/// added to `out` (see [`Showing`]).
fn extras_peers(
    out: &mut String,
    t: &Tunnel,
    link: &Link,
    tap: bool,
    which: std::ops::Range<usize>,
) {
    let now = Instant::now();
    for (cfg, endpoint, s) in t.peers_in(which) {
        out.push_str(&format!("tapir_peer={}\n", cfg.public.to_hex()));
        if let Some(r) = cfg.rate {
            out.push_str(&format!("tapir_rate={r}\n"));
        }
        if tap {
            out.push_str(&format!(
                "tapir_mac_count={}\n",
                t.peer_mac_count(&cfg.public)
            ));
            if s.macs_evicted > 0 {
                out.push_str(&format!("tapir_macs_evicted={}\n", s.macs_evicted));
            }
            for m in t.peer_macs(now, &cfg.public).iter().take(64) {
                out.push_str(&format!("tapir_mac={}\n", tapir_wire::summary::mac(m)));
            }
        }
        let dr = &s.drops;
        put_nonzero(
            out,
            "tapir_drop_",
            &[
                ("not_allowed", dr.not_allowed),
                ("multicast_source", dr.multicast_source),
                ("loop_back", dr.loop_back),
                ("wrong_layer", dr.wrong_layer),
                ("rate_rx", dr.rate_rx),
                ("rate_tx", dr.rate_tx),
                ("queue_full", dr.queue_full),
                ("not_theirs", dr.not_theirs),
                ("local_mac", dr.local_mac),
                ("invalid", s.dropped),
            ],
        );
        if let Link::Tcp(tcp) = link {
            let target = cfg.endpoint.or(endpoint);
            // In words, and in fields for a script (`status --json`).
            let (state, word) = match target.and_then(|a| tcp.dial_state(a)) {
                Some((tcp::DialState::Open, _, _)) => ("connected".to_string(), "connected"),
                Some((tcp::DialState::Connecting, _, _)) => {
                    ("connecting".to_string(), "connecting")
                }
                Some((tcp::DialState::Waiting { until }, failures, err)) => {
                    let wait = until.saturating_duration_since(now);
                    out.push_str(&format!(
                        "tapir_connection_attempt={}\ntapir_connection_retry_ms={}\n",
                        failures + 1,
                        wait.as_millis()
                    ));
                    if let Some(e) = err {
                        out.push_str(&format!("tapir_connection_error={e}\n"));
                    }
                    (
                        format!(
                            "reconnecting in {:.1} s (attempt {}{})",
                            wait.as_secs_f64(),
                            failures + 1,
                            err.map(|e| format!(", last: {e}")).unwrap_or_default()
                        ),
                        "reconnecting",
                    )
                }
                None if endpoint.is_some_and(|a| tcp.connected_to(a)) => {
                    ("connected (accepted)".into(), "accepted")
                }
                None => ("no connection (waits to be contacted)".into(), "waiting"),
            };
            out.push_str(&format!("tapir_connection_state={word}\n"));
            out.push_str(&format!("tapir_connection={state}\n"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_of_many_peers_is_answered_a_slice_at_a_time_and_whole() {
        let peers: Vec<PeerConfig> = (0..300u32)
            .map(|i| {
                let mut key = [0u8; 32];
                key[1..5].copy_from_slice(&i.to_le_bytes());
                PeerConfig {
                    public: tapir_proto::wg::keys::PrivateKey::from_random(key).public_key(),
                    psk: None,
                    endpoint: None,
                    allowed_ips: vec![format!("10.1.{}.{}/32", i / 256, i % 256).parse().unwrap()],
                    keepalive: None,
                    rate: None,
                }
            })
            .collect();
        let t = Tunnel::new(
            tapir_proto::wg::keys::PrivateKey::from_random([1; 32]),
            peers,
        );
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let link = Link::Udp(&socket);
        // (Its counters alone are read: the tunnel shown is `t`.)
        let shared = Shared {
            tunnel: Mutex::new(Tunnel::new(
                tapir_proto::wg::keys::PrivateKey::from_random([2; 32]),
                Vec::new(),
            )),
            counters: Counters::default(),
            sources: Sources::default(),
            connected: None,
        };
        for tapir in [false, true] {
            let (tx, rx) = mpsc::channel();
            let mut job = Showing::new(&t, tx, tapir, 51820, 7);
            let mut slices = 1;
            while !job.slice(&t, &shared, &link, Mode::Tun, true) {
                assert!(rx.try_recv().is_err(), "sent before it is whole");
                slices += 1;
            }
            let reply = rx.try_recv().unwrap();
            let wg = crate::uapi::get_with(&t, Some(t.private_key()), 51820, 7, !tapir);
            if tapir {
                // WireGuard's slices (128, 128, 44), then tapir's.
                assert_eq!(slices, 6);
                let body = wg.strip_suffix("errno=0\n\n").unwrap();
                let own = reply.strip_prefix(body).expect("WireGuard's lines first");
                assert!(own.starts_with("tapir_mode=tun\n"), "{own:.200}");
                assert_eq!(own.matches("tapir_peer=").count(), 300);
                assert!(own.ends_with("\nerrno=0\n\n"));
                assert!(!reply.contains("private_key="));
            } else {
                assert_eq!(slices, 3);
                assert_eq!(reply, wg);
                assert_eq!(reply.matches("public_key=").count(), 300);
            }
        }
    }

    /// Host names to look up again follow `wg set` (an endpoint given is
    /// not looked up over) and reloads (a name changed or gone is not
    /// looked up any more; one unchanged keeps when it was last looked up).
    #[test]
    fn host_names_follow_wg_set_and_reloads() {
        let k = |n: u8| tapir_proto::wg::keys::PrivateKey::from_random([n; 32]).public_key();
        let (a, b) = (k(1), k(2));
        let at = Instant::now();
        let mut t = Timers {
            started: Duration::ZERO,
            host_seen: 0,
            lookups: HashMap::from([
                (a, ("a.example:51820".into(), Some(at))),
                (b, ("b.example:51820".into(), None)),
            ]),
            warned_layer: Vec::new(),
        };
        t.pin(&b);
        assert!(t.looks_up(&a) && !t.looks_up(&b));
        t.reload_lookups(&[(a, "a.example:51820".into()), (b, "c.example:51820".into())]);
        assert_eq!(
            t.lookups[&a].1,
            Some(at),
            "unchanged: its last look-up kept"
        );
        assert!(t.looks_up(&b), "a new name in the file is looked up");
        t.reload_lookups(&[(b, "c.example:51820".into())]);
        assert!(!t.looks_up(&a), "an address now (or gone): not looked up");
    }

    #[test]
    fn a_tap_mac_is_the_same_for_a_key_and_name_and_locally_administered() {
        let a = tapir_proto::wg::keys::PrivateKey::from_random([1; 32]).public_key();
        let b = tapir_proto::wg::keys::PrivateKey::from_random([2; 32]).public_key();
        let (n0, n1) = (IfName::new("tap0").unwrap(), IfName::new("tap1").unwrap());
        let m = tap_mac(&a, &n0);
        assert_eq!(m, tap_mac(&a, &n0));
        assert_ne!(m, tap_mac(&a, &n1));
        assert_ne!(m, tap_mac(&b, &n0));
        for m in [m, tap_mac(&a, &n1), tap_mac(&b, &n0)] {
            assert_eq!(m[0] & 0x03, 0x02, "locally administered, unicast: {m:02x?}");
        }
    }

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
    fn the_wall_clock_runs_with_the_monotonic_one_and_is_read_again_each_second() {
        let mut c = WallClock::new();
        let (t0, w0) = (c.at, c.wall);
        let ms = Duration::from_millis;
        assert_eq!(c.at(t0 + ms(500)), w0 + ms(500));
        // The system clock stepped by an hour: seen within a second.
        c.wall = w0 - Duration::from_secs(3600);
        assert_eq!(c.at(t0 + ms(900)), w0 - Duration::from_secs(3600) + ms(900));
        assert!(c.at(t0 + ms(1000)).abs_diff(wall()) < ms(1000));
        assert!(c.at(t0 + ms(1500)).abs_diff(wall()) < ms(1000));
    }

    #[test]
    fn a_habit_is_trusted_after_four_times_and_checked_every_eighth() {
        let trusted: Vec<u32> = (0..20).filter(|&n| habitual(n)).collect();
        assert_eq!(trusted, [4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 17, 18, 19]);
        // Wrapped, a count is learnt again: the next ones include checks.
        assert!(habitual(u32::MAX));
        assert!(!habitual(u32::MAX.wrapping_add(1)));
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
