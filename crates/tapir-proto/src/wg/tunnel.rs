//! A WireGuard interface as a sans-IO state machine: peers, their sessions
//! and timers, allowed IPs, roaming, and cookies under load.
//!
//! ```text
//!   tun packet ─▶ encapsulate(now, buf, len) ─▶ Encapsulated::Send { to, len }   datagram in buf
//!                                          └▶ Encapsulated::Queued            (handshake started)
//!   UDP datagram ─▶ decapsulate(now, from, buf, len) ─▶ Decapsulated::Packet { range }  to the tun
//!                                                   └▶ Nothing / Dropped(why)
//!   poll_transmit(now, buf) ─▶ handshakes, cookie replies, keepalives, queued packets
//!   handle_timeout(now) / poll_timeout()   retries, rekeys, keepalives, expiry
//! ```
//! `encapsulate_to` and `decapsulate` also come in halves, for a caller that
//! shares the tunnel between threads and keeps the cipher work outside its
//! lock: `prepare_to` does the bookkeeping and gives a [`SealJob`];
//! `receive` gives an [`Opening`] for a data message, which is opened
//! anywhere and handed back to `accept`.
//! Time is an `Instant` the caller passes in (plus the wall clock for
//! handshake timestamps); randomness comes through [`Random`]. Nothing here
//! does I/O, and nothing allocates on the data path (control messages and the
//! few packets queued while a handshake runs are the exception).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::allowed::AllowedIps;
use super::handshake::{self, HandshakeError, Identity, PeerStatic, PendingInitiation};
use super::keys::{PresharedKey, PrivateKey, PublicKey};
use super::messages::{self, COOKIE_LEN, INITIATION_LEN, Kind, RESPONSE_LEN, field};
use super::ratelimit::SourceLimiter;
use super::session::{OpenJob, Padding, SealJob, Session, SessionError};
use crate::bucket::{Offer, Shaper};
use crate::switch::{self, Destination, Mac, MacTable};

/// Whitepaper §6.1.
pub const REKEY_AFTER_MESSAGES: u64 = 1 << 60;
/// Whitepaper §6.1.
pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
/// Whitepaper §6.1.
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
/// Whitepaper §6.1.
pub const REKEY_ATTEMPT_TIME: Duration = Duration::from_secs(90);

/// Initiations of a handshake that gets no answer, before it is given up
/// (when the next retry is due), as the kernel and wireguard-go count
/// them: the first and 19 retries (their `attempts > MAX_TIMER_HANDSHAKES`,
/// REKEY_ATTEMPT_TIME / REKEY_TIMEOUT = 18, lets one more through), so
/// about 100 s.
pub const MAX_INITIATIONS: u8 = 20;

/// A handshake is given up this long after its first initiation at the
/// latest, however its retries went (20 of 5 s and the most jitter).
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(
    (MAX_INITIATIONS as u64 + 1) * REKEY_TIMEOUT.as_secs() + REKEY_TIMEOUT.as_secs(),
);
/// Whitepaper §6.1.
pub const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes one [`Tunnel::handle_timeout`] starts at most (64: 3-6 ms
/// of work); more wait for its next pass, at once. 10,000 peers due at
/// once held a tunnel's packets for 964 ms.
pub const INITIATIONS_PER_PASS: usize = 64;
/// Whitepaper §6.1.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a cookie stays valid.
pub const COOKIE_LIFETIME: Duration = Duration::from_secs(120);
/// Handshake messages per second above which mac2 (a cookie) is required.
pub const UNDER_LOAD_PER_SECOND: u32 = 128;
/// Packets kept per peer while its handshake runs.
pub const QUEUE_LIMIT: usize = 64;
/// Bytes kept per peer while its handshake runs: 64 packets of a 1500-byte
/// MTU, but only one of 64 KiB (the oldest go first).
pub const QUEUE_BYTES: usize = 96 * 1024;

/// A source of random bytes (the OS in the daemon, a seeded stream in tests).
pub trait Random {
    /// Fills `buf`.
    fn fill(&mut self, buf: &mut [u8]);
}

fn random<const N: usize>(rng: &mut dyn Random) -> [u8; N] {
    let mut b = [0u8; N];
    rng.fill(&mut b);
    b
}

/// A peer's configuration.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// Its public key.
    pub public: PublicKey,
    /// Preshared key.
    pub psk: Option<PresharedKey>,
    /// Where to send until it speaks from elsewhere.
    pub endpoint: Option<SocketAddr>,
    /// Its allowed IPs.
    pub allowed_ips: Vec<IpNet>,
    /// Persistent keepalive interval.
    pub keepalive: Option<Duration>,
    /// A rate limit in bits per second, each direction (tapir's extension).
    pub rate: Option<u64>,
}

/// Counters and times of one peer, for status output.
#[derive(Clone, Debug, Default)]
pub struct PeerStats {
    /// Bytes of datagrams received (authenticated).
    pub rx_bytes: u64,
    /// Bytes of datagrams sent.
    pub tx_bytes: u64,
    /// When the last handshake completed (wall clock).
    pub last_handshake: Option<Duration>,
    /// Datagrams dropped as forged, replayed or malformed.
    pub dropped: u64,
    /// Packets dropped by a rule (allowed IPs, the switch, the rate...).
    pub drops: Drops,
    /// Tap mode: learned MACs of the peer that a new one displaced, the
    /// peer being at its cap (the frame itself goes on).
    pub macs_evicted: u64,
}

/// Packets of one peer dropped after they authenticated (or, for `rate_tx`,
/// before they were sealed), by the rule that dropped them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Drops {
    /// A source address outside the peer's allowed IPs (in tap mode: the
    /// sender address of an IPv4, IPv6 or ARP frame).
    pub not_allowed: u64,
    /// Tap mode: a frame with a broadcast or multicast source MAC.
    pub multicast_source: u64,
    /// Tap mode: a frame addressed to a MAC learned on the peer it came from.
    pub loop_back: u64,
    /// The other end is in the other mode: Ethernet frames to a tun tunnel,
    /// or IP packets to a tap tunnel.
    pub wrong_layer: u64,
    /// Over the peer's rate, arriving.
    pub rate_rx: u64,
    /// Over the peer's rate, leaving.
    pub rate_tx: u64,
    /// Leaving while a handshake runs and the queue was full.
    pub queue_full: u64,
    /// Tap mode: a frame from a MAC of this side's own stations, heard from
    /// here within the last 10 s (see `switch::PROTECTED_FOR`).
    pub local_mac: u64,
    /// Tap mode: a frame to one MAC, this peer's by the switch, for an IP
    /// address outside the peer's allowed IPs: not sent to it.
    pub not_theirs: u64,
}

/// What a tunnel's data carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layer {
    /// IP packets, routed by allowed IPs (WireGuard).
    #[default]
    Ip,
    /// Ethernet frames, switched by a MAC table (tapir's tap mode): frames
    /// are sealed without padding, since an Ethernet frame carries no length.
    Ethernet,
}

/// A port of the tap-mode switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Port {
    /// The local tap device.
    Local,
    /// A peer, by its public key.
    Peer(PublicKey),
}

/// In this order (`repr(C)`): the deadlines a message compares with and the
/// session's counters lie together (see [`Session`]).
#[repr(C)]
struct Timed {
    /// `created` plus REJECT_AFTER_TIME, REKEY_AFTER_TIME, and the age at
    /// which an initiator rekeys on receipt: a packet compares instants
    /// rather than working out an age.
    rejects_at: Instant,
    rekeys_at: Instant,
    rekeys_on_receipt_at: Instant,
    created: Instant,
    session: Session,
}

impl Timed {
    fn new(session: Session, created: Instant) -> Self {
        Self {
            session,
            created,
            rejects_at: created + REJECT_AFTER_TIME,
            rekeys_at: created + REKEY_AFTER_TIME,
            rekeys_on_receipt_at: created + (REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT),
        }
    }
}

/// In this order (`repr(C)`): what every data message reads or writes
/// first (endpoint, timers, counters, the current session's deadlines and
/// counters), so that a lone packet touches a few adjacent cache lines of
/// a peer, not one in each of its kilobytes; the handshake's state after.
#[repr(C)]
struct Peer {
    endpoint: Option<SocketAddr>,
    last_sent: Option<Instant>,
    last_received: Option<Instant>,
    last_data_sent: Option<Instant>,
    last_data_received: Option<Instant>,
    /// Data arrived: unless we send something first, a keepalive is due then.
    passive_keepalive_at: Option<Instant>,
    keepalive_due: bool,
    /// A persistent keepalive was just turned on: the first goes at once
    /// (as the kernel's and wireguard-go's `wg set ... persistent-keepalive`).
    keepalive_turned_on: bool,
    /// A handshake asked for at start ([`Tunnel::handshake_all`]), made at
    /// the next timer pass.
    handshake_soon: bool,
    stats: PeerStats,
    queue: VecDeque<Vec<u8>>,
    /// The rate limit, leaving and arriving.
    tx_shaper: Option<Shaper>,
    rx_shaper: Option<Shaper>,
    current: Option<Timed>,
    previous: Option<Timed>,
    /// A responder's session, waiting for the initiator's first data message.
    next: Option<Timed>,
    config: PeerConfig,
    keys: PeerStatic,
    pending: Option<(PendingInitiation, Instant)>,
    /// When we began trying to handshake (for GIVE_UP_AFTER).
    attempt_started: Option<Instant>,
    /// Initiations sent since then.
    attempts: u8,
    last_timestamp: [u8; 12],
    last_initiation_received: Option<Instant>,
    cookie: Option<([u8; 16], Instant)>,
    /// Our index and the mac1 of the last response we sent: a peer under
    /// load answers a response without a valid mac2 with a cookie reply
    /// to that index, sealed with that mac1 (whitepaper §5.4.7).
    response_mac1: Option<(u32, [u8; 16])>,
}

/// What became of a packet from the tun device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encapsulated {
    /// Send `buf[..len]` to `to`.
    Send {
        /// The peer's endpoint.
        to: SocketAddr,
        /// The datagram's length.
        len: usize,
    },
    /// Kept until a handshake completes, or until the peer's rate allows
    /// it: sent later by `poll_transmit`.
    Queued,
    /// No peer's allowed IPs contain the destination.
    NoRoute,
    /// The peer has no endpoint yet.
    NoEndpoint,
    /// Not an IP packet, or the buffer is too small.
    Invalid,
    /// Over the peer's rate: dropped and counted.
    RateLimited,
    /// Tap mode: broadcast, multicast or unknown unicast. Seal a copy for
    /// every peer with [`Tunnel::encapsulate_to`].
    Flood,
}

/// Where a packet from the device goes (see [`Tunnel::target`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// To this peer (an index for [`Tunnel::encapsulate_to`]).
    Peer(usize),
    /// Tap mode: to every peer.
    Flood,
    /// Nowhere, and why.
    Nowhere(Encapsulated),
}

/// What sealing a packet for a peer comes to (see [`Tunnel::prepare_to`]).
pub enum Sealing {
    /// Seal with the job (it needs nothing of the tunnel) and send to `to`.
    Seal {
        /// The counter and keys.
        job: SealJob,
        /// The peer's endpoint.
        to: SocketAddr,
    },
    /// Nothing to seal now, and why (queued, rate-limited, no route...).
    Not(Encapsulated),
}

/// A datagram from the network, its first half done (see [`Tunnel::receive`]).
pub enum Received {
    /// A data message of a known session whose counter is fresh: open it
    /// ([`Opening::open`]) and hand the result to [`Tunnel::accept`].
    Open(Opening),
    /// Handled whole (handshakes, cookies, drops).
    Done(Decapsulated),
}

/// A data message to open outside the tunnel (see [`Tunnel::receive`]).
pub struct Opening {
    job: OpenJob,
    local_index: u32,
    /// Where the session was (peer, slot): [`Tunnel::accept`] looks there
    /// first, and up the index only if it has moved meanwhile.
    at: (usize, usize),
}

impl Opening {
    /// Decrypts the message in place (the datagram given to [`Tunnel::receive`]).
    pub fn open(&self, msg: &mut [u8]) -> Result<usize, SessionError> {
        self.job.open(msg)
    }
}

/// What became of a datagram from the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decapsulated {
    /// Write `buf[range]` to the tun device.
    Packet(std::ops::Range<usize>),
    /// Tap mode: a frame for a MAC learned on another peer (the hub forwards
    /// between its spokes): seal `buf[range]` for peer `to` with
    /// [`Tunnel::encapsulate_to`], and do not write it to the tap.
    Forward {
        /// The frame.
        range: std::ops::Range<usize>,
        /// The peer (an index as in [`Tunnel::peer_index`]).
        to: usize,
    },
    /// Tap mode: broadcast, multicast or unknown unicast: write `buf[range]`
    /// to the tap, and seal a copy for every peer but `from`.
    Flood {
        /// The frame.
        range: std::ops::Range<usize>,
        /// The peer it came from.
        from: usize,
    },
    /// Handled (a handshake, a keepalive, a cookie); check `poll_transmit`.
    Nothing,
    /// Refused, counted, no reply.
    Dropped(DropReason),
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not a WireGuard message.
    Malformed,
    /// A handshake message that did not authenticate.
    Handshake(HandshakeError),
    /// Data for no session of ours.
    UnknownIndex,
    /// Data that did not decrypt, or a replay.
    Session(SessionError),
    /// A decrypted packet whose source is not in the peer's allowed IPs.
    NotAllowed,
    /// An initiation older than the last one seen, or too soon after it.
    StaleInitiation,
    /// Under load and no valid mac2: answered with a cookie.
    Cookie,
    /// Tap mode: dropped by the switch (see [`Drops`]).
    Switch,
    /// The other end is in the other mode (tun against tap).
    WrongLayer,
    /// Over the peer's rate, or (handshakes under load) over the source
    /// address's 20 a second.
    RateLimited,
}

/// Datagrams dropped before any peer could be named for them (a peer's own
/// drops are in its [`PeerStats`]): what garbage, a client with an unknown
/// key or a stale session send.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unattributed {
    /// Not a WireGuard message.
    pub malformed: u64,
    /// A handshake from a key that is no peer's.
    pub unknown_key: u64,
    /// A handshake message that did not authenticate (mac1, decryption).
    pub bad_handshake: u64,
    /// A message for no session or handshake of ours (an index unknown).
    pub no_session: u64,
    /// Handshakes answered with a cookie, under load.
    pub cookie_replies: u64,
}

impl Unattributed {
    fn count(&mut self, why: &DropReason) {
        match why {
            DropReason::Malformed => self.malformed += 1,
            DropReason::Handshake(HandshakeError::UnknownPeer) => self.unknown_key += 1,
            DropReason::Handshake(_) => self.bad_handshake += 1,
            DropReason::UnknownIndex => self.no_session += 1,
            DropReason::Cookie => self.cookie_replies += 1,
            _ => {}
        }
    }
}

/// A WireGuard interface. In this order (`repr(C)`): what every packet
/// reads first, together.
#[repr(C)]
pub struct Tunnel {
    layer: Layer,
    /// The device's MTU, which IP packets are not padded past (0: unknown).
    mtu: usize,
    peers: Vec<Peer>,
    /// Our session indices -> peer. Looked up for every datagram, with the
    /// index the datagram names: a fast hash, not SipHash (it was 2% of the
    /// receiving side). Safe from hash flooding because only we insert, and
    /// what we insert is random.
    by_index: rustc_hash::FxHashMap<u32, usize>,
    /// Peers with a rate limit (whose queues may hold packets back).
    rated: Vec<usize>,
    outgoing: VecDeque<(SocketAddr, Vec<u8>)>,
    /// See [`Tunnel::take_doubtful`].
    doubtful: Vec<SocketAddr>,
    /// Handshakes [`Tunnel::handle_timeout`] left for its next pass (more
    /// were due than [`INITIATIONS_PER_PASS`]).
    initiations_left: bool,
    /// Peers that may have something for poll_transmit (queued packets,
    /// a keepalive, a rate limit's backlog), and a flag per peer.
    tx_hint: Vec<usize>,
    routes: AllowedIps<usize>,
    hinted: Vec<bool>,
    id: Identity,
    by_key: HashMap<PublicKey, usize>,
    cookie_secret: [u8; 32],
    cookie_secret_at: Option<Instant>,
    load_window: (Option<Instant>, u32),
    under_load_until: Option<Instant>,
    /// Messages come over a transport that has proven their source address
    /// (TCP's handshake did): under load no cookie is asked for.
    sources_proven: bool,
    limiter: SourceLimiter,
    switch: MacTable<Port>,
    unattributed: Unattributed,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        // The cookie secret (the keys are wiped by their own types).
        zeroize::Zeroize::zeroize(&mut self.cookie_secret);
    }
}

/// The source (`dst == false`) or destination address of an IP packet.
fn ip_address(packet: &[u8], dst: bool) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => {
            let at = if dst { 16 } else { 12 };
            let b: [u8; 4] = packet.get(at..at + 4)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        6 => {
            let at = if dst { 24 } else { 8 };
            let b: [u8; 16] = packet.get(at..at + 16)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        _ => None,
    }
}

/// The destination of a frame sent to one MAC (not a group) that carries
/// IPv4 or IPv6 (or the target of an ARP message), under up to two VLAN
/// tags.
fn frame_unicast_destination(frame: &[u8]) -> Option<IpAddr> {
    if frame.first()? & 1 != 0 {
        return None;
    }
    let (ethertype, l3) = frame_payload(frame).ok()?;
    match ethertype {
        0x0800 | 0x86dd => ip_address(l3, true),
        // ARP: the target protocol address (an answer to the station's
        // question goes to the station, not to a peer that took its MAC).
        0x0806 => {
            let b: [u8; 4] = l3.get(24..28)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        _ => None,
    }
}

/// A frame's EtherType and what follows it, under up to two VLAN tags
/// (802.1Q, 802.1ad). `Err`: cut short, or a third tag.
fn frame_payload(frame: &[u8]) -> Result<(u16, &[u8]), ()> {
    const VLAN: [u16; 2] = [0x8100, 0x88a8];
    let ethertype_at = |at: usize| {
        frame
            .get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or(())
    };
    let mut at = 12;
    let mut ethertype = ethertype_at(at)?;
    for _ in 0..2 {
        if !VLAN.contains(&ethertype) {
            break;
        }
        at += 4;
        ethertype = ethertype_at(at)?;
    }
    if VLAN.contains(&ethertype) {
        return Err(());
    }
    Ok((ethertype, frame.get(at + 2..).ok_or(())?))
}

/// The real length of the IP packet at the start of a padded plaintext:
/// `None` unless it covers its own header and fits.
fn ip_len(plain: &[u8]) -> Option<usize> {
    let len = match plain.first()? >> 4 {
        4 => {
            let len = usize::from(u16::from_be_bytes(plain.get(2..4)?.try_into().ok()?));
            let header = usize::from(plain[0] & 0xf) * 4;
            if header < 20 || len < header {
                return None;
            }
            len
        }
        6 => 40 + usize::from(u16::from_be_bytes(plain.get(4..6)?.try_into().ok()?)),
        _ => return None,
    };
    (len <= plain.len()).then_some(len)
}

/// The destination and source MACs of an Ethernet frame.
fn macs(frame: &[u8]) -> Option<(Mac, Mac)> {
    if frame.len() < 14 {
        return None;
    }
    Some((frame[0..6].try_into().ok()?, frame[6..12].try_into().ok()?))
}

/// Whether a padded plaintext is an IP packet (a tun peer's data reaching a tap tunnel).
///
/// A frame's first bytes are its destination MAC, and one MAC in a few
/// hundred reads as an IP version and length that fit one frame length a
/// multiple of 16: taken for IP, every frame of that length to that MAC
/// was lost (a TCP segment retransmitted at the same size, a stall). So
/// the packet must also be whole as WireGuard pads it: zeros after the
/// IP length, an IPv4 header that sums right; and a frame with a usual
/// EtherType where a frame has one is a frame.
fn looks_like_padded_ip(plain: &[u8]) -> bool {
    let Some(n) = ip_len(plain) else {
        return false;
    };
    let v4_header = usize::from(plain[0] & 0xf) * 4;
    let ethertype = plain.get(12..14).map(|b| u16::from_be_bytes([b[0], b[1]]));
    plain.len() % 16 == 0
        && n + 16 > plain.len()
        && n >= 20
        && plain[n..].iter().all(|&b| b == 0)
        && if plain[0] >> 4 == 6 {
            n >= 40
        } else {
            v4_header >= 20 && tapir_wire::checksum::verify(&plain[..v4_header])
        }
        && !matches!(ethertype, Some(0x0800 | 0x86dd | 0x0806 | 0x8100 | 0x88a8))
}

/// Whether a plaintext that is not IP is an Ethernet frame (a tap peer's
/// data reaching a tun tunnel): an Ethernet II EtherType where it belongs.
fn looks_like_ethernet(plain: &[u8]) -> bool {
    plain.len() >= 14 && u16::from_be_bytes([plain[12], plain[13]]) >= 0x0600
}

/// The addresses a tap peer's frame claims, for the allowed-IPs check:
/// the IPv4 or IPv6 source, the ARP sender, and the target an IPv6
/// Neighbor Advertisement announces (what neighbours' caches take). Under
/// up to two VLAN tags (802.1Q, 802.1ad); a third is refused, as a frame
/// the check would not see into. An unspecified source claims nothing only
/// where a host without an address sends: a DHCP client (UDP 68 to 67),
/// ICMPv6 or hop-by-hop options (duplicate address detection, MLD), an ARP
/// probe; elsewhere it is claimed, and passes only a peer allowed
/// everything. `[None, None]`: no IP sender (other protocols). `Err`:
/// truncated.
fn frame_claims(frame: &[u8]) -> Result<[Option<IpAddr>; 2], ()> {
    let (ethertype, l3) = frame_payload(frame)?;
    match ethertype {
        0x0800 => {
            let ip = ip_address(l3, false).ok_or(())?;
            let header = usize::from(l3[0] & 0xf) * 4;
            let ports = l3.get(header..header + 4);
            let dhcp = l3.get(9) == Some(&17) && ports == Some(&[0, 68, 0, 67][..]);
            Ok([(!(ip.is_unspecified() && dhcp)).then_some(ip), None])
        }
        0x86dd => {
            let ip = ip_address(l3, false).ok_or(())?;
            let (upper, at) = ipv6_upper(l3)?;
            let icmp = if upper == 58 { l3.get(at) } else { None };
            // Without an address: duplicate address detection's neighbour
            // solicitation, the MLD reports sent meanwhile, and router
            // solicitations (RFC 4861 allows ::), nothing else.
            let without_address =
                ip.is_unspecified() && matches!(icmp, Some(&(133 | 135 | 131 | 132 | 143)));
            // A Neighbor Advertisement (ICMPv6 type 136) and its target,
            // behind whatever extension headers come first.
            let target = if icmp == Some(&136) {
                let t: [u8; 16] = l3
                    .get(at + 8..at + 24)
                    .ok_or(())?
                    .try_into()
                    .map_err(|_| ())?;
                Some(IpAddr::from(t))
            } else {
                None
            };
            Ok([(!without_address).then_some(ip), target])
        }
        0x0806 => {
            let b: [u8; 4] = l3.get(14..18).ok_or(())?.try_into().map_err(|_| ())?;
            let ip = IpAddr::from(b);
            Ok([(!ip.is_unspecified()).then_some(ip), None])
        }
        _ => Ok([None, None]),
    }
}

/// The upper-layer protocol of IPv6 packet `ip` and where its header
/// starts, past the extension headers (hop-by-hop, routing, destination
/// options, a first fragment's header). A later fragment, ESP or an
/// unknown header ends the walk there: its protocol is reported, with
/// nothing of an upper layer to read. `Err`: an extension header cut short.
fn ipv6_upper(ip: &[u8]) -> Result<(u8, usize), ()> {
    let mut next = *ip.get(6).ok_or(())?;
    let mut at = 40;
    for _ in 0..8 {
        match next {
            // Hop-by-hop, routing, destination options: length in 8-octet
            // units past the first 8.
            0 | 43 | 60 => {
                let h = ip.get(at..at + 2).ok_or(())?;
                next = h[0];
                at += 8 + usize::from(h[1]) * 8;
            }
            44 => {
                let h = ip.get(at..at + 8).ok_or(())?;
                let offset = u16::from_be_bytes([h[2], h[3]]) >> 3;
                if offset != 0 {
                    return Ok((44, at));
                }
                next = h[0];
                at += 8;
            }
            _ => return Ok((next, at)),
        }
    }
    Err(())
}

fn expired(t: &Timed, now: Instant) -> bool {
    now >= t.rejects_at
}

impl Peer {
    /// A data message of `n` bytes went out: it counts as traffic, and it
    /// stands in for any keepalive that was due.
    fn sent_data(&mut self, now: Instant, n: usize) {
        self.last_sent = Some(now);
        self.last_data_sent.get_or_insert(now);
        self.stats.tx_bytes += n as u64;
        self.keepalive_due = false;
        self.passive_keepalive_at = None;
    }

    /// A data message of `bytes` from `from` authenticated, its plaintext
    /// `plain` bytes (0: a keepalive): the peer roams there, and is alive.
    fn received_data(&mut self, now: Instant, from: SocketAddr, bytes: usize, plain: usize) {
        self.endpoint = Some(from);
        self.last_received = Some(now);
        self.stats.rx_bytes += bytes as u64;
        // Any authenticated packet, keepalives included, shows the peer is alive.
        self.last_data_sent = None;
        if plain > 0 {
            self.last_data_received = Some(now);
            // Armed once per silence, as the kernel does: a steady one-way stream
            // still gets a keepalive back every KEEPALIVE_TIMEOUT.
            self.passive_keepalive_at
                .get_or_insert_with(|| now + KEEPALIVE_TIMEOUT);
        }
    }

    fn usable(&self, now: Instant) -> bool {
        self.current.as_ref().is_some_and(|t| !expired(t, now))
    }

    /// Session slot 0 (current), 1 (previous) or 2 (next).
    fn slot(&mut self, slot: usize) -> Option<&mut Timed> {
        match slot {
            0 => self.current.as_mut(),
            1 => self.previous.as_mut(),
            _ => self.next.as_mut(),
        }
    }
}

impl Tunnel {
    /// An interface with our private key and its peers.
    pub fn new(private: PrivateKey, peers: Vec<PeerConfig>) -> Self {
        Self::with_layer(
            private,
            peers,
            Layer::Ip,
            switch::DEFAULT_AGING,
            switch::DEFAULT_CAP,
        )
    }

    /// An interface that carries `layer`, with the switch's aging time and
    /// per-peer cap of learned MACs (used in tap mode only). The layer is
    /// set before the peers come: in tap mode a prefix may be several
    /// peers' (made with the layer still IP, each shared prefix went to
    /// the last peer alone, and the fe80::/10 every peer needs with it).
    pub fn with_layer(
        private: PrivateKey,
        peers: Vec<PeerConfig>,
        layer: Layer,
        aging: Duration,
        mac_cap: usize,
    ) -> Self {
        let id = Identity::new(private);
        let mut t = Self {
            id,
            peers: Vec::new(),
            by_key: HashMap::new(),
            by_index: rustc_hash::FxHashMap::default(),
            routes: AllowedIps::new(),
            outgoing: VecDeque::new(),
            doubtful: Vec::new(),
            initiations_left: false,
            cookie_secret: [0; 32],
            cookie_secret_at: None,
            load_window: (None, 0),
            under_load_until: None,
            sources_proven: false,
            limiter: SourceLimiter::new(),
            unattributed: Unattributed::default(),
            layer,
            mtu: 0,
            switch: MacTable::new(aging, mac_cap),
            tx_hint: Vec::new(),
            hinted: Vec::new(),
            rated: Vec::new(),
        };
        for p in peers {
            t.add_peer(p);
        }
        t
    }

    /// What the tunnel carries.
    pub fn layer(&self) -> Layer {
        self.layer
    }

    /// Messages arrive over a transport that proves where they come from
    /// (TCP: a connection is accepted only after the peer answered at its
    /// address). Under load, a cookie reply is what proves an address over
    /// UDP; over such a transport it proves nothing more and costs the
    /// initiator 5 s (and a reconnect loses its cookie, bound to the port):
    /// handshakes are then only rate-limited per address.
    pub fn set_sources_proven(&mut self, proven: bool) {
        self.sources_proven = proven;
    }

    /// The MTU of the device the tunnel's packets come from (0: unknown):
    /// IP packets are padded to a multiple of 16, but not past it (see
    /// [`super::session::padded`]). Set it again when the device's MTU changes.
    pub fn set_mtu(&mut self, mtu: usize) {
        self.mtu = mtu;
    }

    /// How a plaintext of this tunnel is padded.
    fn padding(&self) -> Padding {
        match self.layer {
            Layer::Ip => Padding::Ip { mtu: self.mtu },
            Layer::Ethernet => Padding::None,
        }
    }

    /// Datagrams dropped before a peer could be named for them.
    pub fn unattributed(&self) -> &Unattributed {
        &self.unattributed
    }

    /// How many peers there are (indices for [`Tunnel::encapsulate_to`]).
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// The counters of peer `p`.
    pub fn peer_stats(&self, p: usize) -> Option<&PeerStats> {
        self.peers.get(p).map(|peer| &peer.stats)
    }

    /// The public key of peer `p` (an index is good only while the tunnel
    /// stays locked: a removal moves peers to other indices).
    pub fn peer_key(&self, p: usize) -> Option<PublicKey> {
        self.peers.get(p).map(|peer| peer.config.public)
    }

    /// The configuration of the peer with key `public`, and the endpoint
    /// it is sent to now (where it roamed, or the configured one).
    pub fn peer_config(&self, public: &PublicKey) -> Option<(&PeerConfig, Option<SocketAddr>)> {
        let p = &self.peers[*self.by_key.get(public)?];
        Some((&p.config, p.endpoint))
    }

    /// The peer whose endpoint is `at` (a walk over the peers: for what
    /// happens once a connection, not once a packet).
    pub fn peer_at(&self, at: SocketAddr) -> Option<PublicKey> {
        self.peers
            .iter()
            .find(|p| p.endpoint == Some(at))
            .map(|p| p.config.public)
    }

    /// The index of the peer with key `public`.
    pub fn peer_index(&self, public: &PublicKey) -> Option<usize> {
        self.by_key.get(public).copied()
    }

    /// Tap mode: the MACs learned on the peer with key `public`.
    pub fn peer_macs(&self, now: Instant, public: &PublicKey) -> Vec<Mac> {
        self.switch.macs(now, Port::Peer(*public))
    }

    /// Tap mode: how many MACs the switch holds for the peer `public`.
    pub fn peer_mac_count(&self, public: &PublicKey) -> usize {
        self.switch.count(Port::Peer(*public))
    }

    /// Our public key.
    pub fn public_key(&self) -> PublicKey {
        self.id.public()
    }

    /// Maps peer `idx`'s allowed IPs to it, taking each from the peer that
    /// had it: in WireGuard an allowed IP belongs to one peer, the one it was
    /// given to last. Costs one probe per prefix, whatever the peer count.
    /// In tap mode allowed IPs route nothing (MACs do): they only filter
    /// what each peer may claim, and one prefix may be several peers' (the
    /// link-local fe80::/10 of a segment, say), so none is taken.
    fn claim_allowed_ips(&mut self, idx: usize) {
        if self.layer == Layer::Ethernet {
            return;
        }
        let mine: Vec<IpNet> = self.peers[idx]
            .config
            .allowed_ips
            .iter()
            .map(IpNet::trunc)
            .collect();
        // What each previous owner loses, taken from its list at once (one
        // pass per owner, not one per prefix).
        let mut taken: HashMap<usize, std::collections::HashSet<IpNet>> = HashMap::new();
        for net in mine {
            if let Some(prev) = self.routes.insert(&net, idx) {
                if prev != idx {
                    taken.entry(prev).or_default().insert(net);
                }
            }
        }
        for (prev, nets) in taken {
            self.peers[prev]
                .config
                .allowed_ips
                .retain(|n| !nets.contains(&n.trunc()));
        }
    }

    /// Adds (or replaces) a peer.
    pub fn add_peer(&mut self, config: PeerConfig) {
        self.remove_peer(&config.public);
        let keys = PeerStatic::new(&self.id, config.public, config.psk.clone());
        let idx = self.peers.len();
        self.by_key.insert(config.public, idx);
        self.peers.push(Peer {
            endpoint: config.endpoint,
            keys,
            current: None,
            previous: None,
            next: None,
            pending: None,
            attempt_started: None,
            attempts: 0,
            last_timestamp: [0; 12],
            last_initiation_received: None,
            cookie: None,
            response_mac1: None,
            queue: VecDeque::new(),
            last_sent: None,
            last_received: None,
            last_data_sent: None,
            last_data_received: None,
            keepalive_due: false,
            passive_keepalive_at: None,
            keepalive_turned_on: false,
            handshake_soon: false,
            stats: PeerStats::default(),
            tx_shaper: config.rate.map(Shaper::new),
            rx_shaper: config.rate.map(Shaper::new),
            config,
        });
        self.claim_allowed_ips(idx);
        self.hinted.push(false);
        if self.peers[idx].config.rate.is_some() {
            self.rated.push(idx);
        }
    }

    /// A new private key (`wg set wg0 private-key FILE`), taken as the
    /// kernel takes it: a peer that has the new public key goes (a tunnel
    /// is not its own peer), each peer's handshake keys are made again, and
    /// every session and handshake in flight is dropped, so that the next
    /// packet to a peer starts a handshake under the new identity. `false`
    /// (nothing changed) if it is the key the tunnel has.
    pub fn set_private_key(&mut self, private: PrivateKey) -> bool {
        let public = private.public_key();
        if public == self.id.public() {
            return false;
        }
        self.remove_peer(&public);
        self.id = Identity::new(private);
        self.by_index.clear();
        let id = &self.id;
        for p in &mut self.peers {
            p.keys = PeerStatic::new(id, p.config.public, p.config.psk.clone());
            (p.current, p.previous, p.next, p.pending) = (None, None, None, None);
            p.attempt_started = None;
            p.response_mac1 = None;
        }
        true
    }

    /// The private key (for `wg showconf`, SaveConfig).
    pub fn private_key(&self) -> &PrivateKey {
        self.id.private()
    }

    /// Changes a peer's configuration in place, keeping its sessions (what
    /// `wg set wg0 peer KEY allowed-ips ...` does). `false` if there is no such peer.
    pub fn update_peer(
        &mut self,
        public: &PublicKey,
        change: impl FnOnce(&mut PeerConfig),
    ) -> bool {
        let Some(&idx) = self.by_key.get(public) else {
            return false;
        };
        let peer = &mut self.peers[idx];
        let before_ips: Vec<IpNet> = peer.config.allowed_ips.iter().map(IpNet::trunc).collect();
        let before_psk = peer.config.psk.clone();
        let before_endpoint = peer.config.endpoint;
        let before_rate = peer.config.rate;
        let before_keepalive = peer.config.keepalive;
        change(&mut peer.config);
        if before_keepalive.is_none() && peer.config.keepalive.is_some() {
            peer.keepalive_turned_on = true;
        }
        peer.config.public = *public;
        let rate_changed = peer.config.rate != before_rate;
        if rate_changed {
            peer.tx_shaper = peer.config.rate.map(Shaper::new);
            peer.rx_shaper = peer.config.rate.map(Shaper::new);
        }
        // Compared in place: no copies of the keys in strings.
        let same_psk = match (peer.config.psk.as_ref(), before_psk.as_ref()) {
            (None, None) => true,
            (Some(a), Some(b)) => a.0 == b.0,
            _ => false,
        };
        if !same_psk {
            peer.keys = PeerStatic::new(&self.id, *public, peer.config.psk.clone());
        }
        if peer.config.endpoint != before_endpoint {
            peer.endpoint = peer.config.endpoint;
        }
        let after: std::collections::HashSet<IpNet> =
            peer.config.allowed_ips.iter().map(IpNet::trunc).collect();
        for net in before_ips.iter().filter(|n| !after.contains(n)) {
            match self.routes.remove(net) {
                Some(owner) if owner != idx => {
                    self.routes.insert(net, owner);
                }
                _ => {}
            }
        }
        self.claim_allowed_ips(idx);
        if rate_changed {
            self.reindex();
        }
        true
    }

    /// Sends to peer `public` at `addr` from now on, as `wg set ... endpoint`
    /// does: its configured endpoint and the one it roamed to both become
    /// `addr`, even where the configured one was `addr` already (the peer
    /// roamed away from it). `false` if there is no such peer.
    pub fn set_endpoint(&mut self, public: &PublicKey, addr: SocketAddr) -> bool {
        let Some(&idx) = self.by_key.get(public) else {
            return false;
        };
        let peer = &mut self.peers[idx];
        peer.config.endpoint = Some(addr);
        peer.endpoint = Some(addr);
        true
    }

    /// Each `(to, bytes)`: bytes for `to` were not sent after all (a
    /// transport dropped them before they left): the peer's transfer count
    /// leaves them out, as the kernel counts only what it sent. The peers
    /// are found by one map of their endpoints where there are more than a
    /// few (a walk over 10,000 peers for each of 4,096 refused datagrams
    /// held the tunnel's lock).
    pub fn not_sent_all(&mut self, unsent: &[(SocketAddr, usize)]) {
        let take = |p: &mut Peer, bytes: usize| {
            p.stats.tx_bytes = p.stats.tx_bytes.saturating_sub(bytes as u64);
        };
        if unsent.len() <= 4 {
            for &(to, bytes) in unsent {
                if let Some(p) = self.peers.iter_mut().find(|p| p.endpoint == Some(to)) {
                    take(p, bytes);
                }
            }
            return;
        }
        // (The first peer at an endpoint, as the walk finds it.)
        let mut at: HashMap<SocketAddr, usize> = HashMap::new();
        for (i, p) in self.peers.iter().enumerate() {
            if let Some(e) = p.endpoint {
                at.entry(e).or_insert(i);
            }
        }
        for &(to, bytes) in unsent {
            if let Some(&i) = at.get(&to) {
                take(&mut self.peers[i], bytes);
            }
        }
    }

    /// The endpoints of peers whose handshake went unanswered (a retry) or
    /// that fell silent, since the last call: a path in doubt.
    pub fn take_doubtful(&mut self) -> std::vec::Drain<'_, SocketAddr> {
        self.doubtful.drain(..)
    }

    /// Removes a peer and its sessions.
    pub fn remove_peer(&mut self, public: &PublicKey) -> bool {
        self.by_key.contains_key(public)
            && self.remove_peers(&std::collections::HashSet::from([*public])) == 1
    }

    /// Removes every peer whose key is in `gone`. Returns how many it
    /// removed. A few (a `wg set ... remove`, a peer replaced by a new key)
    /// go one at a time, the last peer taking each one's place, at a cost
    /// that does not grow with the peers left; many (a `wg setconf` that
    /// replaces 10,000 peers) with one rebuild of the indices and routes
    /// for all of them, which keeps the order of the rest.
    pub fn remove_peers(&mut self, gone: &std::collections::HashSet<PublicKey>) -> usize {
        let found = gone.iter().filter(|k| self.by_key.contains_key(k)).count();
        if found == 0 {
            return 0;
        }
        // One at a time walks the sessions, the send hints and the MACs
        // once a removal; the rebuild walks the peers once.
        if found.saturating_mul(16) <= self.peers.len() {
            for k in gone {
                if let Some(&idx) = self.by_key.get(k) {
                    self.remove_at(idx);
                }
            }
            return found;
        }
        let mut next = 0;
        let moved: Vec<Option<usize>> = self
            .peers
            .iter()
            .map(|p| {
                (!gone.contains(&p.config.public)).then(|| {
                    next += 1;
                    next - 1
                })
            })
            .collect();
        for p in self
            .peers
            .iter()
            .filter(|p| gone.contains(&p.config.public))
        {
            self.switch.forget_port(Port::Peer(p.config.public));
        }
        let mut i = 0;
        self.peers.retain(|_| {
            i += 1;
            moved[i - 1].is_some()
        });
        self.by_key = self
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| (p.config.public, i))
            .collect();
        self.by_index.retain(|_, p| moved[*p].is_some());
        for p in self.by_index.values_mut() {
            *p = moved[*p].expect("kept");
        }
        self.rebuild_routes();
        self.reindex();
        found
    }

    /// Removes peer `idx`, the last peer taking its place (so the order of
    /// the peers changes, as the order of wireguard-go's does; the kernel's
    /// list keeps it): its key, its routes (tun mode: each of its allowed
    /// IPs is its own), its sessions and its send hints are dropped, and the
    /// last peer's are renamed. A hash probe per allowed IP of either, and
    /// a walk over our sessions, the peers with something to send and (tap
    /// mode) the learned MACs, none of which grows with idle peers in tun
    /// mode.
    fn remove_at(&mut self, idx: usize) {
        let last = self.peers.len() - 1;
        let peer = self.peers.swap_remove(idx);
        self.hinted.swap_remove(idx);
        self.by_key.remove(&peer.config.public);
        self.switch.forget_port(Port::Peer(peer.config.public));
        let routed = self.layer == Layer::Ip;
        if routed {
            for net in &peer.config.allowed_ips {
                match self.routes.remove(net) {
                    Some(owner) if owner != idx => {
                        self.routes.insert(net, owner);
                    }
                    _ => {}
                }
            }
        }
        let rename = |p: &mut usize| {
            if *p == last {
                *p = idx;
            }
        };
        self.by_index.retain(|_, p| {
            let keep = *p != idx;
            rename(p);
            keep
        });
        for list in [&mut self.tx_hint, &mut self.rated] {
            list.retain(|&p| p != idx);
            list.iter_mut().for_each(rename);
        }
        if idx == last {
            return;
        }
        let moved = &self.peers[idx];
        self.by_key.insert(moved.config.public, idx);
        if routed {
            for net in &moved.config.allowed_ips {
                self.routes.insert(net, idx);
            }
        }
    }

    /// After a removal shifted the peer indices (tun mode: in tap mode
    /// allowed IPs route nothing, see [`Tunnel::claim_allowed_ips`]).
    fn rebuild_routes(&mut self) {
        self.routes.clear();
        if self.layer == Layer::Ethernet {
            return;
        }
        for (i, p) in self.peers.iter().enumerate() {
            for n in &p.config.allowed_ips {
                self.routes.insert(n, i);
            }
        }
    }

    /// Test hook: panics unless every index of peers says what the peers
    /// themselves say (their keys, their allowed IPs in tun mode, their
    /// sessions and handshakes, their send hints and rates).
    #[cfg(test)]
    fn check_indices(&self) {
        let n = self.peers.len();
        assert_eq!(self.by_key.len(), n, "one key each");
        for (i, p) in self.peers.iter().enumerate() {
            assert_eq!(self.by_key.get(&p.config.public), Some(&i), "key of {i}");
        }
        if self.layer == Layer::Ip {
            let mut nets = std::collections::HashSet::new();
            for (i, p) in self.peers.iter().enumerate() {
                for net in &p.config.allowed_ips {
                    assert_eq!(self.routes.exact(net), Some(i), "{net} of {i}");
                    nets.insert(net.trunc());
                }
            }
            assert_eq!(self.routes.len(), nets.len(), "no route of a peer gone");
        } else {
            assert!(self.routes.is_empty(), "tap mode routes nothing");
        }
        let mut held = 0;
        for (i, p) in self.peers.iter().enumerate() {
            let sessions = [&p.current, &p.previous, &p.next]
                .into_iter()
                .flatten()
                .map(|t| t.session.local_index);
            for index in sessions.chain(p.pending.as_ref().map(|(h, _)| h.local_index)) {
                assert_eq!(self.by_index.get(&index), Some(&i), "index {index} of {i}");
                held += 1;
            }
        }
        assert_eq!(self.by_index.len(), held, "no index of a session gone");
        assert_eq!(self.hinted.len(), n);
        let hints: std::collections::HashSet<usize> = self.tx_hint.iter().copied().collect();
        assert_eq!(hints.len(), self.tx_hint.len(), "each hint once");
        for (i, &h) in self.hinted.iter().enumerate() {
            assert_eq!(h, hints.contains(&i), "hint of {i}");
        }
        let mut rated = self.rated.clone();
        rated.sort_unstable();
        let want: Vec<usize> = (0..n)
            .filter(|&i| self.peers[i].config.rate.is_some())
            .collect();
        assert_eq!(rated, want, "the peers with a rate");
    }

    fn route(&self, dst: IpAddr) -> Option<usize> {
        self.routes.get(dst)
    }

    /// Test hook: pretends peer `p`'s current session has sent `n` messages.
    #[cfg(test)]
    fn set_sent(&mut self, p: usize, n: u64) {
        if let Some(t) = self.peers[p].current.as_mut() {
            t.session.set_sent(n);
        }
    }

    /// The peers' public keys, endpoints and statistics.
    pub fn peers(&self) -> impl Iterator<Item = (&PeerConfig, Option<SocketAddr>, &PeerStats)> {
        self.peers_in(0..self.peers.len())
    }

    /// [`Tunnel::peers`] by index, `which` (cut to the peers there are):
    /// for what goes through them a slice at a time.
    pub fn peers_in(
        &self,
        which: std::ops::Range<usize>,
    ) -> impl Iterator<Item = (&PeerConfig, Option<SocketAddr>, &PeerStats)> {
        let end = which.end.min(self.peers.len());
        self.peers[which.start.min(end)..end]
            .iter()
            .map(|p| (&p.config, p.endpoint, &p.stats))
    }

    fn new_index(&mut self, rng: &mut dyn Random, peer: usize) -> u32 {
        loop {
            let i = u32::from_le_bytes(random(rng));
            if let std::collections::hash_map::Entry::Vacant(slot) = self.by_index.entry(i) {
                slot.insert(peer);
                return i;
            }
        }
    }

    fn forget(&mut self, t: Option<Timed>) {
        if let Some(t) = t {
            self.by_index.remove(&t.session.local_index);
        }
    }

    /// Starts a handshake with peer `p` unless one is in flight; whether
    /// it did (an initiation is two Diffie-Hellman operations and more:
    /// 50-100 µs).
    #[cold]
    #[inline(never)]
    fn initiate(&mut self, p: usize, now: Instant, wall: Duration, rng: &mut dyn Random) -> bool {
        if self.peers[p]
            .pending
            .as_ref()
            .is_some_and(|(_, at)| now.saturating_duration_since(*at) < REKEY_TIMEOUT)
        {
            return false;
        }
        let Some(to) = self.peers[p].endpoint else {
            return false;
        };
        if let Some((old, _)) = self.peers[p].pending.take() {
            self.by_index.remove(&old.local_index);
        }
        let index = self.new_index(rng, p);
        let cookie = self.peers[p]
            .cookie
            .filter(|(_, at)| now.saturating_duration_since(*at) < COOKIE_LIFETIME)
            .map(|(c, _)| c);
        let mut msg = [0u8; INITIATION_LEN];
        let peer = &mut self.peers[p];
        let Ok(pending) = handshake::write_initiation(
            &self.id,
            &peer.keys,
            index,
            random(rng),
            wall,
            cookie.as_ref(),
            &mut msg,
        ) else {
            // A key of small order: never a handshake with it.
            self.by_index.remove(&index);
            return false;
        };
        // Jitter the retry by up to a third of a second (whitepaper §6.1).
        let jitter = Duration::from_millis(u64::from(u16::from_le_bytes(random(rng))) % 334);
        peer.pending = Some((pending, now + jitter));
        if peer.attempt_started.is_none() {
            peer.attempt_started = Some(now);
            peer.attempts = 0;
        }
        peer.attempts = peer.attempts.saturating_add(1);
        peer.last_sent = Some(now);
        peer.stats.tx_bytes += INITIATION_LEN as u64;
        self.outgoing.push_back((to, msg.to_vec()));
        true
    }

    /// Handshakes with every peer that has an endpoint, at start: a tunnel
    /// that restarted has no sessions, and a peer that still holds the old
    /// ones would otherwise send into the void until its own timer (15 s)
    /// gives up on them. Made by the timers ([`Tunnel::handle_timeout`],
    /// at once), [`INITIATIONS_PER_PASS`] at a time: 10,000 at once would
    /// hold the first packet about a second.
    pub fn handshake_all(&mut self) {
        for peer in self.peers.iter_mut().filter(|p| p.endpoint.is_some()) {
            peer.handshake_soon = true;
        }
        self.initiations_left = self.peers.iter().any(|p| p.handshake_soon);
    }

    /// The path to `addr` has just been (re)established (a TCP connection
    /// opened): peers whose endpoint is `addr` handshake over it at once,
    /// since whatever was sent before it is lost.
    pub fn path_opened(
        &mut self,
        now: Instant,
        wall: Duration,
        rng: &mut dyn Random,
        addr: SocketAddr,
    ) {
        // An initiation still waiting in the queue goes out on this very
        // connection: a second one now would cross it (the peer would take
        // the first and refuse the second as too soon, and we would wait for
        // an answer to the second).
        if self.outgoing.iter().any(|(to, _)| *to == addr) {
            return;
        }
        for p in 0..self.peers.len() {
            if self.peers[p].endpoint == Some(addr) {
                if let Some((old, _)) = self.peers[p].pending.take() {
                    self.by_index.remove(&old.local_index);
                }
                self.initiate(p, now, wall, rng);
            }
        }
    }

    /// Encrypts the IP packet at `buf[16..16 + len]` for the peer whose allowed
    /// IPs hold its destination. `buf` needs room for the header before and
    /// padding and tag after (see [`crate::wg::session`]).
    pub fn encapsulate(
        &mut self,
        now: Instant,
        wall: Duration,
        rng: &mut dyn Random,
        buf: &mut [u8],
        len: usize,
    ) -> Encapsulated {
        let Some(packet) = buf.get(16..16 + len) else {
            return Encapsulated::Invalid;
        };
        match self.target(now, packet) {
            Target::Peer(p) => self.encapsulate_to(p, now, wall, rng, buf, len),
            Target::Flood => Encapsulated::Flood,
            Target::Nowhere(why) => why,
        }
    }

    /// Tap mode: whether `frame` may go to peer `p`. A frame to one MAC that
    /// carries IP goes only to a peer whose allowed IPs (when it has any)
    /// hold its destination, as a tun tunnel routes by them: a peer that
    /// takes over another's MAC gets none of the other's traffic. (Counted
    /// as `not_theirs` where the switch sent it to `p`, not where a flood
    /// passes `p` by.)
    fn theirs(&self, p: usize, frame: &[u8]) -> bool {
        let allowed = &self.peers[p].config.allowed_ips;
        allowed.is_empty()
            || frame_unicast_destination(frame)
                .is_none_or(|ip| allowed.iter().any(|n| n.contains(&ip)))
    }

    /// Where a packet (tun) or frame (tap) read from the device goes, by its
    /// headers alone: the allowed-IPs lookup, or the switch (learning its
    /// source as local). The segments of one TSO super-packet share their
    /// headers, so one call serves them all, with
    /// [`Tunnel::encapsulate_to`] per segment.
    pub fn target(&mut self, now: Instant, packet: &[u8]) -> Target {
        match self.layer {
            Layer::Ip => {
                let Some(dst) = ip_address(packet, true) else {
                    return Target::Nowhere(Encapsulated::Invalid);
                };
                match self.route(dst) {
                    Some(p) => Target::Peer(p),
                    None => Target::Nowhere(Encapsulated::NoRoute),
                }
            }
            Layer::Ethernet => {
                let Some((dst, src)) = macs(packet) else {
                    return Target::Nowhere(Encapsulated::Invalid);
                };
                // What leaves through the tap was sent from this side.
                let _ = self.switch.learn(now, src, Port::Local);
                match self.switch.lookup(now, &dst) {
                    Destination::Port(Port::Peer(k)) => match self.by_key.get(&k).copied() {
                        Some(p) if self.theirs(p, packet) => Target::Peer(p),
                        // Not its address (a peer took the station's MAC
                        // with a frame of its own): flooded as to a MAC
                        // nobody learned, so the station still gets it
                        // wherever it is, and each peer only what is its.
                        Some(p) => {
                            self.peers[p].stats.drops.not_theirs += 1;
                            Target::Flood
                        }
                        None => Target::Flood,
                    },
                    Destination::Port(Port::Local) => Target::Nowhere(Encapsulated::NoRoute),
                    Destination::Flood => Target::Flood,
                }
            }
        }
    }

    /// Seals the packet or frame at `buf[16..16 + len]` for peer `p` (an
    /// index below [`Tunnel::peer_count`]), whatever its destination: the
    /// switch's flooding and forwarding in tap mode. Buffer needs as for
    /// [`Tunnel::encapsulate`].
    pub fn encapsulate_to(
        &mut self,
        p: usize,
        now: Instant,
        wall: Duration,
        rng: &mut dyn Random,
        buf: &mut [u8],
        len: usize,
    ) -> Encapsulated {
        if self.layer == Layer::Ethernet
            && p < self.peers.len()
            && !self.theirs(p, buf.get(16..16 + len).unwrap_or_default())
        {
            return Encapsulated::NoRoute;
        }
        match self.prepare_to(p, now, wall, rng, buf, len) {
            Sealing::Seal { job, to } => match job.seal(buf, len) {
                Ok(len) => Encapsulated::Send { to, len },
                Err(_) => Encapsulated::Invalid,
            },
            Sealing::Not(why) => why,
        }
    }

    /// [`Tunnel::encapsulate_to`] but the sealing: the counter is taken and
    /// the peer's timers and counters updated as if the message were sent,
    /// and the returned job seals `buf[16..16 + len]` (unchanged meanwhile)
    /// without the tunnel.
    pub fn prepare_to(
        &mut self,
        p: usize,
        now: Instant,
        wall: Duration,
        rng: &mut dyn Random,
        buf: &[u8],
        len: usize,
    ) -> Sealing {
        let pad = self.padding();
        let Some(peer) = self.peers.get_mut(p) else {
            return Sealing::Not(Encapsulated::NoRoute);
        };
        let Some(to) = peer.endpoint else {
            return Sealing::Not(Encapsulated::NoEndpoint);
        };
        let sealed = 16 + pad.len(len) + 16;
        if buf.len() < sealed {
            return Sealing::Not(Encapsulated::Invalid);
        }
        if !peer.usable(now) {
            let mut bytes: usize = peer.queue.iter().map(Vec::len).sum::<usize>() + len;
            while !peer.queue.is_empty() && (peer.queue.len() >= QUEUE_LIMIT || bytes > QUEUE_BYTES)
            {
                bytes -= peer.queue.pop_front().map_or(0, |q| q.len());
                peer.stats.drops.queue_full += 1;
            }
            peer.queue.push_back(buf[16..16 + len].to_vec());
            self.hint(p);
            self.initiate(p, now, wall, rng);
            return Sealing::Not(Encapsulated::Queued);
        }
        if let Some(shaper) = peer.tx_shaper.as_mut() {
            match shaper.offer(now, &buf[16..16 + len]) {
                Offer::Pass => {}
                Offer::Queued => {
                    self.hint(p);
                    return Sealing::Not(Encapsulated::Queued);
                }
                Offer::Dropped => {
                    peer.stats.drops.rate_tx += 1;
                    return Sealing::Not(Encapsulated::RateLimited);
                }
            }
        }
        let t = peer.current.as_mut().expect("usable");
        let Ok(job) = t.session.reserve(pad) else {
            return Sealing::Not(Encapsulated::Invalid);
        };
        // Whitepaper §6.2: the initiator rekeys after REKEY_AFTER_TIME;
        // either side after REKEY_AFTER_MESSAGES.
        let rekey =
            (t.session.initiator && now >= t.rekeys_at) || t.session.sent() >= REKEY_AFTER_MESSAGES;
        peer.sent_data(now, sealed);
        if rekey {
            self.initiate(p, now, wall, rng);
        }
        Sealing::Seal { job, to }
    }

    fn note_handshake_load(&mut self, now: Instant) -> bool {
        let (start, count) = &mut self.load_window;
        if start.is_none_or(|s| now.saturating_duration_since(s) >= Duration::from_secs(1)) {
            *start = Some(now);
            *count = 0;
        }
        *count += 1;
        if *count > UNDER_LOAD_PER_SECOND {
            self.under_load_until = Some(now + Duration::from_secs(1));
        }
        self.under_load_until.is_some_and(|u| now < u)
    }

    fn cookie_for(&mut self, now: Instant, rng: &mut dyn Random, from: SocketAddr) -> [u8; 16] {
        if self
            .cookie_secret_at
            .is_none_or(|at| now.saturating_duration_since(at) >= COOKIE_LIFETIME)
        {
            self.cookie_secret = random(rng);
            self.cookie_secret_at = Some(now);
        }
        let source = match from {
            SocketAddr::V4(a) => [&a.ip().octets()[..], &a.port().to_be_bytes()].concat(),
            SocketAddr::V6(a) => [&a.ip().octets()[..], &a.port().to_be_bytes()].concat(),
        };
        handshake::cookie_for(&self.cookie_secret, &source)
    }

    /// Handles the datagram `buf[..len]` from `from`. Data is decrypted in place.
    pub fn decapsulate(
        &mut self,
        now: Instant,
        wall: Duration,
        rng: &mut dyn Random,
        from: SocketAddr,
        buf: &mut [u8],
        len: usize,
    ) -> Decapsulated {
        match self.receive(now, wall, rng, from, buf, len) {
            Received::Done(d) => d,
            Received::Open(opening) => {
                let msg = &mut buf[..len];
                let opened = opening.open(msg);
                self.accept(now, wall, rng, from, opening, opened, msg)
            }
        }
    }

    /// [`Tunnel::decapsulate`] in one pass for the commonest datagram, a
    /// lone data message for its peer's current session in tun mode (a
    /// ping, an ACK), opened in place with the tunnel at hand: no opening
    /// handed out and looked up again. `None` for anything that needs more
    /// (a handshake message, another session, a rekey due on receipt, a
    /// rate limit, tap mode): nothing has changed, and
    /// [`Tunnel::decapsulate`] (or [`Tunnel::receive`]) takes it.
    pub fn decapsulate_lone(
        &mut self,
        now: Instant,
        from: SocketAddr,
        buf: &mut [u8],
        len: usize,
    ) -> Option<Decapsulated> {
        let msg = buf.get_mut(..len)?;
        if self.layer != Layer::Ip || messages::kind(msg) != Some(Kind::Data) {
            return None;
        }
        let receiver = messages::read_u32(msg, field::DATA_RECEIVER);
        let &p = self.by_index.get(&receiver)?;
        let peer = &mut self.peers[p];
        if peer.rx_shaper.is_some() {
            return None;
        }
        let t = peer
            .current
            .as_mut()
            .filter(|t| t.session.local_index == receiver)?;
        if expired(t, now) || (t.session.initiator && now >= t.rekeys_on_receipt_at) {
            return None;
        }
        let plain = match t.session.open(msg) {
            Ok(n) => n,
            Err(e) => {
                peer.stats.dropped += 1;
                return Some(Decapsulated::Dropped(DropReason::Session(e)));
            }
        };
        peer.received_data(now, from, len, plain);
        if plain == 0 {
            return Some(Decapsulated::Nothing); // keepalive
        }
        Some(self.classify(now, p, msg, messages::DATA_HEADER_LEN, plain))
    }

    /// The first half of [`Tunnel::decapsulate`]: handshakes and cookies are
    /// handled whole; a data message for one of our sessions whose counter
    /// is fresh comes back to be opened.
    pub fn receive(
        &mut self,
        now: Instant,
        wall: Duration,
        rng: &mut dyn Random,
        from: SocketAddr,
        buf: &mut [u8],
        len: usize,
    ) -> Received {
        let r = self.receive_inner(now, wall, rng, from, buf, len);
        if let Received::Done(Decapsulated::Dropped(why)) = &r {
            self.unattributed.count(why);
        }
        r
    }

    fn receive_inner(
        &mut self,
        now: Instant,
        wall: Duration,
        rng: &mut dyn Random,
        from: SocketAddr,
        buf: &mut [u8],
        len: usize,
    ) -> Received {
        let Some(msg) = buf.get_mut(..len) else {
            return Received::Done(Decapsulated::Dropped(DropReason::Malformed));
        };
        Received::Done(match messages::kind(msg) {
            Some(Kind::Data) => return self.data_opening(now, msg),
            Some(Kind::Initiation) | Some(Kind::Response) => {
                self.receive_handshake(now, wall, rng, from, msg)
            }
            Some(Kind::Cookie) => self.receive_cookie(now, msg),
            None => Decapsulated::Dropped(DropReason::Malformed),
        })
    }

    #[cold]
    #[inline(never)]
    fn receive_handshake(
        &mut self,
        now: Instant,
        wall: Duration,
        rng: &mut dyn Random,
        from: SocketAddr,
        msg: &[u8],
    ) -> Decapsulated {
        if let Err(e) = handshake::verify_mac1(&self.id, msg) {
            return Decapsulated::Dropped(DropReason::Handshake(e));
        }
        // The response to a handshake of ours (its receiver index is a
        // pending one: a look-up, no Diffie-Hellman) does not count toward
        // the load (a hub that starts with more peers than the threshold
        // would be put under load by their answers, and hear them only
        // after a cookie and 5 s), and passes the bucket for all addresses;
        // under a load from elsewhere it needs its cookie, as the kernel's.
        let receiver = messages::read_u32(msg, field::RESP_RECEIVER);
        let ours = msg.len() == RESPONSE_LEN
            && self.by_index.get(&receiver).is_some_and(|&p| {
                self.peers[p]
                    .pending
                    .as_ref()
                    .is_some_and(|(pending, _)| pending.local_index == receiver)
            });
        let loaded = if ours {
            self.under_load_until.is_some_and(|u| now < u)
        } else {
            self.note_handshake_load(now)
        };
        if loaded {
            let cookie = self.cookie_for(now, rng, from);
            if !self.sources_proven && handshake::verify_mac2(&cookie, msg).is_err() {
                let mut reply = [0u8; COOKIE_LEN];
                if handshake::write_cookie_reply(&self.id, msg, &cookie, random(rng), &mut reply)
                    .is_ok()
                {
                    self.outgoing.push_back((from, reply.to_vec()));
                }
                return Decapsulated::Dropped(DropReason::Cookie);
            }
            // A valid cookie proves the address, not good faith: each
            // address gets 20 handshakes a second, before any Diffie-Hellman.
            let allowed = if ours {
                self.limiter.allow_own_response(now, from.ip())
            } else {
                self.limiter.allow(now, from.ip())
            };
            if !allowed {
                return Decapsulated::Dropped(DropReason::RateLimited);
            }
        }
        if msg.len() == INITIATION_LEN {
            self.receive_initiation(now, rng, from, msg)
        } else {
            let d = self.receive_response(now, wall, from, msg);
            // One that claimed to answer ours and did not (a forgery made
            // from our initiation's index: it cost a Diffie-Hellman) counts
            // after all: a flood of them puts the tunnel under load.
            if ours && matches!(d, Decapsulated::Dropped(_)) {
                self.note_handshake_load(now);
            }
            d
        }
    }

    fn receive_initiation(
        &mut self,
        now: Instant,
        rng: &mut dyn Random,
        from: SocketAddr,
        msg: &[u8],
    ) -> Decapsulated {
        let (by_key, peers) = (&self.by_key, &self.peers);
        let peer_of = |k: &PublicKey| by_key.get(k).map(|&p| &peers[p].keys);
        let init = match handshake::read_initiation(&self.id, msg, peer_of) {
            Ok(i) => i,
            Err(e) => return Decapsulated::Dropped(DropReason::Handshake(e)),
        };
        let Some(&p) = self.by_key.get(&init.peer) else {
            return Decapsulated::Dropped(DropReason::Handshake(HandshakeError::UnknownPeer));
        };
        let peer = &self.peers[p];
        // Replayed or too-frequent initiations (whitepaper §5.1: 50 per second at most).
        let too_soon = peer
            .last_initiation_received
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_millis(20));
        if init.timestamp <= peer.last_timestamp || too_soon {
            self.peers[p].stats.dropped += 1;
            return Decapsulated::Dropped(DropReason::StaleInitiation);
        }
        let index = self.new_index(rng, p);
        let mut resp = [0u8; RESPONSE_LEN];
        let cookie = self.peers[p]
            .cookie
            .filter(|(_, at)| now.saturating_duration_since(*at) < COOKIE_LIFETIME)
            .map(|(c, _)| c);
        let keys = match handshake::write_response(
            &self.peers[p].keys,
            &init,
            index,
            random(rng),
            cookie.as_ref(),
            &mut resp,
        ) {
            Ok(k) => k,
            Err(e) => {
                self.by_index.remove(&index);
                return Decapsulated::Dropped(DropReason::Handshake(e));
            }
        };
        let old_next = {
            let peer = &mut self.peers[p];
            let mac1: [u8; 16] = resp[field::RESP_MAC1].try_into().expect("16 bytes");
            peer.response_mac1 = Some((index, mac1));
            peer.last_timestamp = init.timestamp;
            peer.last_initiation_received = Some(now);
            peer.endpoint = Some(from);
            peer.last_received = Some(now);
            // Any authenticated message shows the peer is alive (the kernel's
            // wg_timers_any_authenticated_packet_received): no rehandshake
            // for data sent before it.
            peer.last_data_sent = None;
            peer.last_sent = Some(now);
            peer.stats.rx_bytes += INITIATION_LEN as u64;
            peer.stats.tx_bytes += RESPONSE_LEN as u64;
            // (The handshake's time is taken when the initiator's first
            // message confirms it: see `confirm_next`.)
            peer.next.replace(Timed::new(Session::new(&keys), now))
        };
        self.forget(old_next);
        self.outgoing.push_back((from, resp.to_vec()));
        Decapsulated::Nothing
    }

    fn receive_response(
        &mut self,
        now: Instant,
        wall: Duration,
        from: SocketAddr,
        msg: &[u8],
    ) -> Decapsulated {
        let receiver = messages::read_u32(msg, field::RESP_RECEIVER);
        let Some(&p) = self.by_index.get(&receiver) else {
            return Decapsulated::Dropped(DropReason::Handshake(
                HandshakeError::UnexpectedResponse,
            ));
        };
        let peer = &mut self.peers[p];
        let Some((pending, _)) = peer.pending.as_ref() else {
            return Decapsulated::Dropped(DropReason::Handshake(
                HandshakeError::UnexpectedResponse,
            ));
        };
        let keys = match handshake::read_response(&self.id, &peer.keys, pending, msg) {
            Ok(k) => k,
            Err(e) => {
                peer.stats.dropped += 1;
                return Decapsulated::Dropped(DropReason::Handshake(e));
            }
        };
        peer.pending = None;
        peer.attempt_started = None;
        peer.endpoint = Some(from);
        peer.last_received = Some(now);
        peer.last_data_sent = None;
        peer.stats.rx_bytes += RESPONSE_LEN as u64;
        peer.stats.last_handshake = Some(wall);
        let new = Timed::new(Session::new(&keys), now);
        let old_prev = peer.previous.take();
        peer.previous = peer.current.replace(new);
        // The initiator confirms the session with data: queued packets, or a keepalive.
        peer.keepalive_due = peer.queue.is_empty();
        self.forget(old_prev);
        self.hint(p);
        Decapsulated::Nothing
    }

    #[cold]
    #[inline(never)]
    fn receive_cookie(&mut self, now: Instant, msg: &[u8]) -> Decapsulated {
        let receiver = messages::read_u32(msg, field::COOKIE_RECEIVER);
        let Some(&p) = self.by_index.get(&receiver) else {
            return Decapsulated::Dropped(DropReason::UnknownIndex);
        };
        let peer = &mut self.peers[p];
        // A reply to our pending initiation, or to our last response (the
        // peer under load wanted a mac2 on it): each under our index in it.
        let mac1 = match (&peer.pending, &peer.response_mac1) {
            (Some((pending, _)), _) if pending.local_index == receiver => pending.mac1,
            (_, Some((index, mac1))) if *index == receiver => *mac1,
            _ => return Decapsulated::Dropped(DropReason::UnknownIndex),
        };
        match handshake::read_cookie_reply(&peer.keys, &mac1, msg) {
            Ok(c) => {
                peer.cookie = Some((c, now));
                Decapsulated::Nothing
            }
            Err(e) => Decapsulated::Dropped(DropReason::Handshake(e)),
        }
    }

    /// The session a data message is for, its expiry and its counter checked.
    fn data_opening(&mut self, now: Instant, msg: &[u8]) -> Received {
        let receiver = messages::read_u32(msg, field::DATA_RECEIVER);
        let Some((p, slot)) = self.session_of(receiver) else {
            return Received::Done(Decapsulated::Dropped(DropReason::UnknownIndex));
        };
        let peer = &mut self.peers[p];
        let timed = peer.slot(slot).expect("found");
        if expired(timed, now) {
            return Received::Done(Decapsulated::Dropped(DropReason::Session(
                SessionError::Exhausted,
            )));
        }
        match timed.session.opener(msg) {
            Ok(job) => Received::Open(Opening {
                job,
                local_index: receiver,
                at: (p, slot),
            }),
            Err(e) => {
                peer.stats.dropped += 1;
                Received::Done(Decapsulated::Dropped(DropReason::Session(e)))
            }
        }
    }

    /// [`Tunnel::session_of`], looking first at (peer, slot) `at`.
    fn session_at(&mut self, (p, slot): (usize, usize), index: u32) -> Option<(usize, usize)> {
        let here = self
            .peers
            .get_mut(p)
            .and_then(|peer| peer.slot(slot))
            .is_some_and(|t| t.session.local_index == index);
        if here {
            Some((p, slot))
        } else {
            self.session_of(index)
        }
    }

    /// The peer and slot (0 current, 1 previous, 2 next) of our session `index`.
    fn session_of(&self, index: u32) -> Option<(usize, usize)> {
        let &p = self.by_index.get(&index)?;
        let peer = &self.peers[p];
        let slot = [&peer.current, &peer.previous, &peer.next]
            .into_iter()
            .position(|s| s.as_ref().is_some_and(|t| t.session.local_index == index))?;
        Some((p, slot))
    }

    /// The last half of [`Tunnel::decapsulate`]: `opened` is what
    /// [`Opening::open`] made of `msg` (from `from`). Records the counter,
    /// confirms a new session, roams, and says where the packet goes.
    #[allow(clippy::too_many_arguments)]
    pub fn accept(
        &mut self,
        now: Instant,
        wall: Duration,
        rng: &mut dyn Random,
        from: SocketAddr,
        opening: Opening,
        opened: Result<usize, SessionError>,
        msg: &[u8],
    ) -> Decapsulated {
        // The session may have gone (or moved) while the message was opened.
        let Some((p, slot)) = self.session_at(opening.at, opening.local_index) else {
            return Decapsulated::Dropped(DropReason::UnknownIndex);
        };
        let peer = &mut self.peers[p];
        let timed = peer.slot(slot).expect("found");
        let plain = match opened {
            Ok(n) if timed.session.mark(opening.job.counter()) => n,
            Ok(_) => {
                peer.stats.dropped += 1;
                return Decapsulated::Dropped(DropReason::Session(SessionError::Replay));
            }
            Err(e) => {
                peer.stats.dropped += 1;
                return Decapsulated::Dropped(DropReason::Session(e));
            }
        };
        let rekey_on_receipt = timed.session.initiator && now >= timed.rekeys_on_receipt_at;
        if slot == 2 {
            self.confirm_next(p, wall);
        }
        self.peers[p].received_data(now, from, msg.len(), plain);
        // Whitepaper §6.2: an initiator whose session nears its end rekeys
        // on receipt, of a keepalive too (the kernel's keep_key_fresh).
        if rekey_on_receipt {
            self.initiate(p, now, wall, rng);
        }
        if plain == 0 {
            return Decapsulated::Nothing; // keepalive
        }
        let body_at = messages::DATA_HEADER_LEN;
        let peer = &mut self.peers[p];
        if let Some(shaper) = peer.rx_shaper.as_mut() {
            match shaper.offer(now, &msg[body_at..body_at + plain]) {
                Offer::Pass => {}
                // Out later, from poll_received.
                Offer::Queued => return Decapsulated::Nothing,
                Offer::Dropped => {
                    peer.stats.drops.rate_rx += 1;
                    return Decapsulated::Dropped(DropReason::RateLimited);
                }
            }
        }
        self.classify(now, p, msg, body_at, plain)
    }

    /// The initiator's first data message confirms the responder's
    /// session (the peer's next one): it becomes the current one.
    #[cold]
    #[inline(never)]
    fn confirm_next(&mut self, p: usize, wall: Duration) {
        let peer = &mut self.peers[p];
        // Complete only now (the kernel and wireguard-go take its time
        // here): a response answered with nothing, a wrong preshared key
        // say, is no handshake.
        peer.stats.last_handshake = Some(wall);
        let confirmed = peer.next.take();
        let old_prev = peer.previous.take();
        peer.previous = std::mem::replace(&mut peer.current, confirmed);
        // A handshake is complete: one of ours still in flight is not
        // retried (the kernel's wg_timers_handshake_complete).
        let ours = peer.pending.take();
        peer.attempt_started = None;
        peer.attempts = 0;
        if let Some((old, _)) = ours {
            self.by_index.remove(&old.local_index);
        }
        self.forget(old_prev);
        // Packets queued while the handshake ran can go now.
        if !self.peers[p].queue.is_empty() {
            self.hint(p);
        }
    }

    /// Whether a peer has a rate limit (and so may hold packets back).
    #[inline]
    pub fn has_rates(&self) -> bool {
        !self.rated.is_empty()
    }

    /// Packets that a peer's rate limit held back on arrival, once their
    /// time has come: the next one is opened into `buf` (which needs 16
    /// bytes of headroom and the largest packet) and classified as
    /// [`Tunnel::decapsulate`] would. Call until `None`.
    pub fn poll_received(&mut self, now: Instant, buf: &mut [u8]) -> Option<Decapsulated> {
        let body_at = messages::DATA_HEADER_LEN;
        for k in 0..self.rated.len() {
            let p = self.rated[k];
            let Some(shaper) = self.peers[p].rx_shaper.as_mut() else {
                continue;
            };
            if let Some(n) = shaper.release(now, buf.get_mut(body_at..)?) {
                return Some(self.classify(now, p, buf, body_at, n));
            }
        }
        None
    }

    /// When a rate limit next lets a held-back packet go (for the caller's
    /// poll timeout), if any is held.
    pub fn next_release(&mut self, now: Instant) -> Option<Instant> {
        self.next_release_of(now, true)
    }

    /// [`Tunnel::next_release`] for what waits to leave only (for a thread
    /// that only sends).
    pub fn next_send_release(&mut self, now: Instant) -> Option<Instant> {
        self.next_release_of(now, false)
    }

    fn next_release_of(&mut self, now: Instant, arriving: bool) -> Option<Instant> {
        if self.rated.is_empty() {
            return None;
        }
        let peers = &mut self.peers;
        self.rated
            .iter()
            .filter_map(|&p| {
                let peer = &mut peers[p];
                // What waits to leave can only go with a usable session.
                let usable = peer.usable(now);
                let tx = peer
                    .tx_shaper
                    .as_mut()
                    .filter(|_| usable)
                    .and_then(|s| s.next_release(now));
                let rx = peer
                    .rx_shaper
                    .as_mut()
                    .filter(|_| arriving)
                    .and_then(|s| s.next_release(now));
                tx.into_iter().chain(rx).min()
            })
            .min()
    }

    /// After peers were added, removed or changed: the lists of peers with
    /// a rate, and of peers with something to send, rebuilt.
    fn reindex(&mut self) {
        self.rated = (0..self.peers.len())
            .filter(|&p| self.peers[p].config.rate.is_some())
            .collect();
        self.hinted = vec![false; self.peers.len()];
        self.tx_hint.clear();
        for p in 0..self.peers.len() {
            let peer = &self.peers[p];
            if !peer.queue.is_empty()
                || peer.keepalive_due
                || peer.tx_shaper.as_ref().is_some_and(|s| s.queued() > 0)
            {
                self.hint(p);
            }
        }
    }

    /// Where the authenticated plaintext `msg[at..at + plain]` from peer `p` goes.
    fn classify(
        &mut self,
        now: Instant,
        p: usize,
        msg: &[u8],
        body_at: usize,
        plain: usize,
    ) -> Decapsulated {
        let body = &msg[body_at..body_at + plain];
        match self.layer {
            Layer::Ip => {
                let Some(n) = ip_len(body) else {
                    let peer = &mut self.peers[p];
                    // Not IP at all (an IP version nibble with a bad length
                    // is a broken packet, not a frame).
                    if !matches!(body[0] >> 4, 4 | 6) && looks_like_ethernet(body) {
                        peer.stats.drops.wrong_layer += 1;
                        return Decapsulated::Dropped(DropReason::WrongLayer);
                    }
                    peer.stats.dropped += 1;
                    return Decapsulated::Dropped(DropReason::Malformed);
                };
                let allowed = ip_address(body, false).and_then(|src| self.route(src)) == Some(p);
                if !allowed {
                    self.peers[p].stats.drops.not_allowed += 1;
                    return Decapsulated::Dropped(DropReason::NotAllowed);
                }
                Decapsulated::Packet(body_at..body_at + n)
            }
            Layer::Ethernet => self.switch_frame(now, p, body_at..body_at + plain, body),
        }
    }

    /// Tap mode: checks and learns a frame from peer `p` and says where it goes.
    fn switch_frame(
        &mut self,
        now: Instant,
        p: usize,
        range: std::ops::Range<usize>,
        frame: &[u8],
    ) -> Decapsulated {
        let key = self.peers[p].config.public;
        let refuse = |t: &mut Self, why: DropReason, count: fn(&mut Drops) -> &mut u64| {
            *count(&mut t.peers[p].stats.drops) += 1;
            Decapsulated::Dropped(why)
        };
        let Some((dst, src)) = macs(frame) else {
            if looks_like_padded_ip(frame) {
                return refuse(self, DropReason::WrongLayer, |d| &mut d.wrong_layer);
            }
            self.peers[p].stats.dropped += 1;
            return Decapsulated::Dropped(DropReason::Malformed);
        };
        if looks_like_padded_ip(frame) {
            return refuse(self, DropReason::WrongLayer, |d| &mut d.wrong_layer);
        }
        // Cryptokey routing's promise, for frames: a peer with allowed IPs
        // may only send as those addresses.
        if !self.peers[p].config.allowed_ips.is_empty() {
            match frame_claims(frame) {
                Err(()) => {
                    self.peers[p].stats.dropped += 1;
                    return Decapsulated::Dropped(DropReason::Malformed);
                }
                // (Its own list: in tap mode a prefix may be several peers'.)
                Ok(claims)
                    if claims.iter().flatten().any(|ip| {
                        !self.peers[p]
                            .config
                            .allowed_ips
                            .iter()
                            .any(|n| n.contains(ip))
                    }) =>
                {
                    return refuse(self, DropReason::NotAllowed, |d| &mut d.not_allowed);
                }
                Ok(_) => {}
            }
        }
        // A peer held to its allowed IPs may not take this side's stations
        // while they live (it would take their traffic from the host and
        // its LAN into the tunnel); one without, after 10 s of quiet (the
        // station moved there).
        let hold = if self.peers[p].config.allowed_ips.is_empty() {
            switch::PROTECTED_FOR
        } else {
            self.switch.aging()
        };
        match self
            .switch
            .learn_unless(now, src, Port::Peer(key), Port::Local, hold)
        {
            Ok(false) => {}
            Ok(true) => self.peers[p].stats.macs_evicted += 1,
            Err(switch::Refused::Protected) => {
                return refuse(self, DropReason::Switch, |d| &mut d.local_mac);
            }
            Err(_) => {
                return refuse(self, DropReason::Switch, |d| &mut d.multicast_source);
            }
        }
        match self.switch.lookup(now, &dst) {
            Destination::Port(Port::Local) => Decapsulated::Packet(range),
            Destination::Port(Port::Peer(k)) if k == key => {
                refuse(self, DropReason::Switch, |d| &mut d.loop_back)
            }
            Destination::Port(Port::Peer(k)) => match self.by_key.get(&k).copied() {
                Some(to) if self.theirs(to, frame) => Decapsulated::Forward { range, to },
                // (As in `target`.)
                Some(to) => {
                    self.peers[to].stats.drops.not_theirs += 1;
                    Decapsulated::Flood { range, from: p }
                }
                None => Decapsulated::Flood { range, from: p },
            },
            Destination::Flood => Decapsulated::Flood { range, from: p },
        }
    }

    /// Marks peer `p` as having something for [`Tunnel::poll_transmit`].
    fn hint(&mut self, p: usize) {
        if !self.hinted[p] {
            self.hinted[p] = true;
            self.tx_hint.push(p);
        }
    }

    /// A queued packet, a packet a rate limit released, or a keepalive of peer `p`.
    fn transmit_one(
        &mut self,
        p: usize,
        now: Instant,
        pad: Padding,
        buf: &mut [u8],
    ) -> Option<(SocketAddr, usize)> {
        let peer = &mut self.peers[p];
        let to = peer.endpoint?;
        if !peer.usable(now) {
            return None;
        }
        let t = peer.current.as_mut().expect("usable");
        if let Some(packet) = peer.queue.pop_front() {
            if buf.len() >= 16 + pad.len(packet.len()) + 16 {
                buf[16..16 + packet.len()].copy_from_slice(&packet);
                if let Ok(n) = t.session.seal(buf, packet.len(), pad) {
                    peer.sent_data(now, n);
                    return Some((to, n));
                }
            }
        }
        if let Some(n) = peer
            .tx_shaper
            .as_mut()
            .and_then(|s| s.release(now, buf.get_mut(16..)?))
        {
            if let Ok(n) = t.session.seal(buf, n, pad) {
                peer.sent_data(now, n);
                return Some((to, n));
            }
        }
        if peer.keepalive_due {
            peer.keepalive_due = false;
            if let Ok(n) = t.session.seal(buf, 0, pad) {
                peer.passive_keepalive_at = None;
                peer.last_sent = Some(now);
                peer.stats.tx_bytes += n as u64;
                return Some((to, n));
            }
        }
        None
    }

    /// The next datagram to send (handshakes, cookie replies, packets queued
    /// during a handshake, keepalives) into `buf`, which should hold an MTU
    /// plus 32 bytes.
    #[inline]
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<(SocketAddr, usize)> {
        // Most turns of a packet loop have nothing to send: said without a call.
        if !self.may_transmit() {
            return None;
        }
        self.transmit_next(now, buf)
    }

    /// Whether [`Tunnel::poll_transmit`] may have something to send (when
    /// not, a caller need not find room for it).
    #[inline]
    pub fn may_transmit(&self) -> bool {
        !self.outgoing.is_empty() || !self.tx_hint.is_empty()
    }

    fn transmit_next(&mut self, now: Instant, buf: &mut [u8]) -> Option<(SocketAddr, usize)> {
        let pad = self.padding();
        if let Some((to, msg)) = self.outgoing.pop_front() {
            let n = msg.len().min(buf.len());
            buf[..n].copy_from_slice(&msg[..n]);
            return Some((to, n));
        }
        // Only peers that may have something to send are visited: with
        // 10,000 peers, a pass over all of them on every turn of the loop
        // would cost more than the packets.
        let mut i = 0;
        while i < self.tx_hint.len() {
            let p = self.tx_hint[i];
            if let Some(out) = self.transmit_one(p, now, pad, buf) {
                return Some(out);
            }
            let peer = &self.peers[p];
            let pending = !peer.queue.is_empty()
                || peer.keepalive_due
                || peer.tx_shaper.as_ref().is_some_and(|s| s.queued() > 0);
            if pending {
                i += 1;
            } else {
                self.hinted[p] = false;
                self.tx_hint.swap_remove(i);
            }
        }
        None
    }

    /// Runs the timers: handshake retries and giving up, rekeying, keepalives,
    /// expiry of old sessions. Call it at [`Tunnel::poll_timeout`] or sooner.
    pub fn handle_timeout(&mut self, now: Instant, wall: Duration, rng: &mut dyn Random) {
        self.switch.expire(now);
        // Handshakes this pass may still start: the rest wait for the next
        // (which `poll_timeout` makes at once), so that a thousand peers due
        // together do not hold the caller's packets for 100 ms.
        let mut budget = INITIATIONS_PER_PASS;
        self.initiations_left = false;
        for p in 0..self.peers.len() {
            let peer = &mut self.peers[p];
            // Expire sessions three times older than REJECT_AFTER_TIME.
            let mut gone = Vec::new();
            for slot in [&mut peer.current, &mut peer.previous, &mut peer.next] {
                if slot.as_ref().is_some_and(|t| {
                    now.saturating_duration_since(t.created) >= REJECT_AFTER_TIME * 3
                }) {
                    gone.push(slot.take());
                }
            }
            let due = peer
                .pending
                .as_ref()
                .is_some_and(|(_, at)| now.saturating_duration_since(*at) >= REKEY_TIMEOUT);
            if peer.attempt_started.is_some_and(|s| {
                (due && peer.attempts >= MAX_INITIATIONS)
                    || now.saturating_duration_since(s) >= GIVE_UP_AFTER
            }) {
                // Give up; drop what waited for this handshake.
                if let Some((old, _)) = peer.pending.take() {
                    self.by_index.remove(&old.local_index);
                }
                let peer = &mut self.peers[p];
                peer.attempt_started = None;
                peer.queue.clear();
            }
            let peer = &self.peers[p];
            let retry = peer
                .pending
                .as_ref()
                .is_some_and(|(_, at)| now.saturating_duration_since(*at) >= REKEY_TIMEOUT);
            // Sent data but heard nothing back for KEEPALIVE + REKEY_TIMEOUT: rehandshake.
            let silent = peer.last_data_sent.is_some_and(|t| {
                now.saturating_duration_since(t) >= KEEPALIVE_TIMEOUT + REKEY_TIMEOUT
            }) && peer.pending.is_none();
            // Counted from the last authenticated message either way, as
            // the kernel's timer is reset by both.
            let persistent = peer.config.keepalive.is_some_and(|k| {
                peer.keepalive_turned_on
                    || peer
                        .last_sent
                        .max(peer.last_received)
                        .is_none_or(|t| now.saturating_duration_since(t) >= k)
            });
            let keepalive_was_turned_on = std::mem::take(&mut self.peers[p].keepalive_turned_on);
            let peer = &self.peers[p];
            let passive = peer.passive_keepalive_at.is_some_and(|at| now >= at);
            let wanted =
                (persistent && !peer.usable(now) && peer.endpoint.is_some()) || peer.handshake_soon;
            if (retry || silent || wanted) && budget == 0 {
                // Left as it is, due again at the next pass (its expired
                // sessions gone now all the same).
                self.initiations_left = true;
                self.peers[p].keepalive_turned_on |= keepalive_was_turned_on;
                for t in gone {
                    self.forget(t);
                }
                continue;
            }
            if retry || silent {
                if silent {
                    self.peers[p].last_data_sent = None;
                }
                // The way to the peer is in doubt: a caller that sends from
                // a chosen local address chooses again (the kernel's
                // WireGuard clears its source then too).
                if let Some(e) = self.peers[p].endpoint {
                    if self.doubtful.len() < self.peers.len().max(64) {
                        self.doubtful.push(e);
                    }
                }
                budget -= usize::from(self.initiate(p, now, wall, rng));
            } else if wanted {
                budget -= usize::from(self.initiate(p, now, wall, rng));
            }
            self.peers[p].handshake_soon = false;
            let peer = &mut self.peers[p];
            if (persistent || passive) && peer.usable(now) {
                peer.keepalive_due = true;
                peer.passive_keepalive_at = None;
                // A keepalive keeps the key fresh as data does (whitepaper
                // §6.2; the kernel's keep_key_fresh): the initiator rekeys
                // after REKEY_AFTER_TIME (a tunnel of keepalives alone
                // rekeyed only when its session ran out, at 180 s).
                let stale = peer.pending.is_none()
                    && peer
                        .current
                        .as_ref()
                        .is_some_and(|t| t.session.initiator && now >= t.rekeys_at);
                self.hint(p);
                if stale {
                    self.initiate(p, now, wall, rng);
                }
            } else if passive {
                // The session ran out first: nothing to keep alive.
                peer.passive_keepalive_at = None;
            }
            for t in gone {
                self.forget(t);
            }
        }
    }

    /// When [`Tunnel::handle_timeout`] next has work: [`Tunnel::next_deadline`],
    /// and at most a second away, so that timers armed by traffic meanwhile
    /// (all of them 5 s or more out) are seen in time by a caller that does
    /// not look again after traffic.
    pub fn poll_timeout(&self, now: Instant) -> Instant {
        let second = now + Duration::from_secs(1);
        self.next_deadline(now).map_or(second, |t| t.min(second))
    }

    /// When [`Tunnel::handle_timeout`] next has work, as the tunnel stands:
    /// the earliest timer of any peer (a handshake retry or give-up, a
    /// keepalive, a rehandshake after silence, a session's expiry) or of
    /// the MAC table's aging; none if nothing is armed. Traffic and changes
    /// arm timers (none less than 5 s out, but a keepalive turned on): a
    /// caller asks again after them.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        if self.initiations_left {
            return Some(now);
        }
        let mut next = self.switch.next_expiry();
        let mut at = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for peer in &self.peers {
            if peer.handshake_soon {
                at(now);
            }
            for t in [&peer.current, &peer.previous, &peer.next]
                .into_iter()
                .flatten()
            {
                at(t.created + REJECT_AFTER_TIME * 3);
            }
            if let Some(s) = peer.attempt_started {
                at(s + GIVE_UP_AFTER);
            }
            match &peer.pending {
                Some((_, sent)) => at(*sent + REKEY_TIMEOUT),
                None => {
                    if let Some(t) = peer.last_data_sent {
                        at(t + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT);
                    }
                }
            }
            // Keepalives fire only where they can be sent: a known endpoint,
            // and (passive ones) a usable session.
            // (Not while a handshake for want of a session is in flight:
            // its retry is the next thing; a keepalive of 1 s to a peer that
            // did not answer spun the loop until then.)
            let waits_for_handshake = peer.pending.is_some() && !peer.usable(now);
            if let (Some(k), Some(_), false) =
                (peer.config.keepalive, peer.endpoint, waits_for_handshake)
            {
                match peer.last_sent.max(peer.last_received) {
                    Some(t) if !peer.keepalive_turned_on => at(t + k),
                    _ => at(now),
                }
            }
            if let Some(t) = peer.passive_keepalive_at.filter(|_| peer.usable(now)) {
                at(t);
            }
        }
        next.map(|t| t.max(now))
    }
}

#[cfg(test)]
mod tap_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod weak_key_tests {
    use super::*;

    struct Zeros;
    impl Random for Zeros {
        fn fill(&mut self, buf: &mut [u8]) {
            buf.fill(1);
        }
    }

    #[test]
    fn no_initiation_to_a_peer_key_of_small_order() {
        // Built with raw bytes, past the parsers that refuse such keys.
        let mut t = Tunnel::new(
            PrivateKey::from_random([1; 32]),
            vec![PeerConfig {
                public: PublicKey([0; 32]),
                psk: None,
                endpoint: Some("192.0.2.2:51820".parse().unwrap()),
                allowed_ips: vec!["10.0.0.2/32".parse().unwrap()],
                keepalive: Some(Duration::from_secs(1)),
                rate: None,
            }],
        );
        let now = Instant::now();
        let mut buf = [0u8; 2048];
        buf[16] = 0x45;
        buf[16 + 16..16 + 20].copy_from_slice(&[10, 0, 0, 2]);
        let r = t.encapsulate(now, Duration::from_secs(1), &mut Zeros, &mut buf, 20);
        assert_eq!(r, Encapsulated::Queued);
        t.handle_timeout(
            now + Duration::from_secs(10),
            Duration::from_secs(11),
            &mut Zeros,
        );
        assert!(t.poll_transmit(now, &mut buf).is_none(), "nothing is sent");
        assert!(t.by_index.is_empty(), "no index left behind");
    }
}
