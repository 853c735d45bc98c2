//! Links, addresses and routes over rtnetlink, synchronously.
//!
//! ```text
//!   Netlink ──request (NLM_F_ACK)──▶ kernel
//!      ▲                               │
//!      └──── messages… DONE / ACK / error (errno + extended-ack text)
//! ```
//!
//! Messages come from `netlink-packet-route`; this module only frames
//! requests, collects answers and turns them into the plain types below,
//! which mirror what `ip -d link`, `ip addr` and `ip route` show. Attributes of
//! the tun driver that we do not know are kept in [`TunInfo::other`].

use std::io;
use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, Nla,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{InfoData, InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    route::{
        RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol,
        RouteScope, RouteType,
    },
    rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::tun::Mode;

/// A failed netlink request: which, on what, the errno and the kernel's own words.
#[derive(Debug, thiserror::Error)]
#[error("{op} {target}: {source}{kernel}{hint}",
    kernel = kernel_msg.as_ref().map(|m| format!(" ({m})")).unwrap_or_default(),
    hint = netlink_hint(source, kernel_msg.as_deref()))]
pub struct NetlinkError {
    /// The request, e.g. `RTM_NEWADDR`.
    pub op: &'static str,
    /// What it was about, e.g. `10.0.0.1/24 on tun0`.
    pub target: String,
    /// The errno.
    pub source: io::Error,
    /// The kernel's extended-ack message, when it gave one.
    pub kernel_msg: Option<String>,
}

impl NetlinkError {
    /// Why it failed, without the request: the errno, the kernel's words and a hint.
    pub fn reason(&self) -> String {
        let kernel = self
            .kernel_msg
            .as_ref()
            .map(|m| format!(" ({m})"))
            .unwrap_or_default();
        format!(
            "{}{kernel}{}",
            self.source,
            netlink_hint(&self.source, self.kernel_msg.as_deref())
        )
    }

    /// The errno, if the failure came from the kernel.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

fn netlink_hint(e: &io::Error, kernel: Option<&str>) -> &'static str {
    let kernel = kernel.unwrap_or("").to_ascii_lowercase();
    match e.raw_os_error() {
        Some(libc::EPERM) => {
            ": changing links, addresses and routes needs CAP_NET_ADMIN; run with sudo"
        }
        _ if kernel.contains("invalid gateway") || kernel.contains("gateway is not") => {
            ": the gateway is not on a subnet of the device that is up: give the device an address in the gateway's subnet (--addr) and bring it up (--up), or route via an address that is on one"
        }
        _ if kernel.contains("device is not up") => ": bring the device up first (--up)",
        _ if kernel.contains("ipv6 is disabled") => {
            ": IPv6 is off for this device (sysctl net.ipv6.conf.default.disable_ipv6 = 1, or .all): set it to 0 (sysctl -w net.ipv6.conf.default.disable_ipv6=0) before the device is made, or give IPv4 addresses only"
        }
        _ => "",
    }
}

/// Link-state flags of interest, decoded from `ifi_flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkState {
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// The driver says it can carry traffic (`IFF_LOWER_UP`); for tun/tap
    /// that means a process has the device open.
    pub lower_up: bool,
    /// `IFF_PROMISC`.
    pub promisc: bool,
    /// `IFF_POINTOPOINT`.
    pub pointopoint: bool,
    /// `IFF_NOARP`.
    pub noarp: bool,
}

/// What the tun driver reports of a device in `IFLA_INFO_DATA` (Linux 4.15+).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TunInfo {
    /// tun or tap (`IFLA_TUN_TYPE`).
    pub mode: Option<Mode>,
    /// Packet information header on (`IFLA_TUN_PI`).
    pub packet_info: bool,
    /// virtio-net header on (`IFLA_TUN_VNET_HDR`).
    pub vnet_hdr: bool,
    /// Multi-queue (`IFLA_TUN_MULTI_QUEUE`).
    pub multi_queue: bool,
    /// Persistent (`IFLA_TUN_PERSIST`).
    pub persist: bool,
    /// Owner uid, if one was set (`IFLA_TUN_OWNER`).
    pub owner: Option<u32>,
    /// Owner gid, if one was set (`IFLA_TUN_GROUP`).
    pub group: Option<u32>,
    /// Queues attached by processes (`IFLA_TUN_NUM_QUEUES`); the kernel
    /// reports it for multi-queue devices only.
    pub queues: Option<u32>,
    /// Queues detached with IFF_DETACH_QUEUE (`IFLA_TUN_NUM_DISABLED_QUEUES`),
    /// multi-queue devices only.
    pub disabled_queues: Option<u32>,
    /// Attributes this version does not know: (type, value).
    pub other: Vec<(u16, Vec<u8>)>,
}

const IFLA_TUN_OWNER: u16 = 1;
const IFLA_TUN_GROUP: u16 = 2;
const IFLA_TUN_TYPE: u16 = 3;
const IFLA_TUN_PI: u16 = 4;
const IFLA_TUN_VNET_HDR: u16 = 5;
const IFLA_TUN_PERSIST: u16 = 6;
const IFLA_TUN_MULTI_QUEUE: u16 = 7;
const IFLA_TUN_NUM_QUEUES: u16 = 8;
const IFLA_TUN_NUM_DISABLED_QUEUES: u16 = 9;

impl TunInfo {
    /// Decodes the tun driver's attributes from (type, value) pairs.
    pub fn from_attrs<'a>(attrs: impl IntoIterator<Item = (u16, &'a [u8])>) -> Self {
        let mut info = TunInfo::default();
        for (kind, value) in attrs {
            let byte = value.first().copied();
            let word = value
                .get(..4)
                .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
            match (kind, byte, word) {
                (IFLA_TUN_TYPE, Some(t), _) => {
                    info.mode = match libc::c_int::from(t) {
                        libc::IFF_TUN => Some(Mode::Tun),
                        libc::IFF_TAP => Some(Mode::Tap),
                        _ => None,
                    }
                }
                (IFLA_TUN_PI, Some(b), _) => info.packet_info = b != 0,
                (IFLA_TUN_VNET_HDR, Some(b), _) => info.vnet_hdr = b != 0,
                (IFLA_TUN_PERSIST, Some(b), _) => info.persist = b != 0,
                (IFLA_TUN_MULTI_QUEUE, Some(b), _) => info.multi_queue = b != 0,
                (IFLA_TUN_OWNER, _, Some(w)) => info.owner = Some(w),
                (IFLA_TUN_GROUP, _, Some(w)) => info.group = Some(w),
                (IFLA_TUN_NUM_QUEUES, _, Some(w)) => info.queues = Some(w),
                (IFLA_TUN_NUM_DISABLED_QUEUES, _, Some(w)) => info.disabled_queues = Some(w),
                _ => info.other.push((kind, value.to_vec())),
            }
        }
        info
    }
}

/// A network interface as `ip -d link show` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Decoded flags.
    pub state: LinkState,
    /// Operational state (`UP`, `DOWN`, `UNKNOWN`...).
    pub operstate: String,
    /// MTU.
    pub mtu: u32,
    /// Carrier (`IFLA_CARRIER`), reported whether or not the link is up; a
    /// tun/tap device has carrier while a process has it open.
    pub carrier: bool,
    /// Link-layer address (tap devices have a MAC; tun devices none).
    pub address: Option<Vec<u8>>,
    /// `IFLA_INFO_KIND`: `tun` for tun and tap devices, `veth`, `bridge`...
    pub kind: Option<String>,
    /// The tun driver's view, for tun/tap devices.
    pub tun: Option<TunInfo>,
    /// The bridge (or other master) it is a port of (`IFLA_MASTER`).
    pub master: Option<u32>,
}

impl Link {
    /// Whether this is a tun or tap device (`IFLA_INFO_KIND` = `tun`).
    pub fn is_tun(&self) -> bool {
        self.kind.as_deref() == Some("tun")
    }

    fn from_message(msg: &LinkMessage) -> Self {
        let flags = msg.header.flags;
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            state: LinkState {
                up: flags.contains(LinkFlags::Up),
                lower_up: flags.contains(LinkFlags::LowerUp),
                promisc: flags.contains(LinkFlags::Promisc),
                pointopoint: flags.contains(LinkFlags::Pointopoint),
                noarp: flags.contains(LinkFlags::Noarp),
            },
            operstate: String::from("UNKNOWN"),
            mtu: 0,
            carrier: false,
            address: None,
            kind: None,
            tun: None,
            master: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Controller(m) => link.master = Some(*m),
                LinkAttribute::Mtu(m) => link.mtu = *m,
                LinkAttribute::Carrier(c) => link.carrier = *c != 0,
                LinkAttribute::Address(a) => link.address = Some(a.clone()),
                LinkAttribute::OperState(s) => link.operstate = s.to_string().to_uppercase(),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(InfoKind::Tun) => link.kind = Some("tun".into()),
                            LinkInfo::Kind(k) => link.kind = Some(k.to_string()),
                            LinkInfo::Data(InfoData::Tun(attrs)) => {
                                let raw: Vec<(u16, Vec<u8>)> = attrs
                                    .iter()
                                    .map(|a| {
                                        let mut v = vec![0; a.value_len()];
                                        a.emit_value(&mut v);
                                        (a.kind(), v)
                                    })
                                    .collect();
                                link.tun = Some(TunInfo::from_attrs(
                                    raw.iter().map(|(k, v)| (*k, v.as_slice())),
                                ));
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if link.is_tun() && link.tun.is_none() {
            // Kernels before 4.15 send no IFLA_INFO_DATA for tun.
            link.tun = Some(TunInfo::default());
        }
        link
    }
}

/// An address on an interface, as `ip addr` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// Interface index.
    pub index: u32,
    /// The local address with its prefix length.
    pub local: IpNet,
    /// The peer of a point-to-point address (`ip addr add A peer P`).
    pub peer: Option<IpNet>,
    /// Scope: `global`, `link`, `host`...
    pub scope: String,
}

/// The main routing table (`ip route` without `table`).
pub const MAIN_TABLE: u32 = 254;
/// The kernel's table of the host's own and broadcast addresses.
const LOCAL_TABLE: u32 = 255;

/// A route, as `ip route` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination prefix.
    pub dst: IpNet,
    /// Gateway (`via`).
    pub gateway: Option<IpAddr>,
    /// Output interface index.
    pub oif: Option<u32>,
    /// Routing table.
    pub table: u32,
    /// Who added it: `kernel`, `boot`, `static`...
    pub protocol: String,
    /// Scope: `link`, `universe`...
    pub scope: String,
    /// Metric (`RTA_PRIORITY`).
    pub metric: Option<u32>,
    /// `unicast`, `local`, `broadcast`, `blackhole`, `unreachable`, `prohibit`...
    pub kind: String,
    /// The paths of a multipath route (`nexthop via G dev D` each): gateway
    /// and interface index; empty for a route of one path.
    pub nexthops: Vec<(Option<IpAddr>, u32)>,
}

impl Route {
    /// Whether it sends packets out of interface `index` (alone, or as one
    /// of its paths).
    pub fn through(&self, index: u32) -> bool {
        self.oif == Some(index) || self.nexthops.iter().any(|h| h.1 == index)
    }

    /// The gateway toward interface `index` (of its path there).
    pub fn gateway_on(&self, index: u32) -> Option<IpAddr> {
        if self.oif == Some(index) {
            return self.gateway;
        }
        self.nexthops
            .iter()
            .find(|h| h.1 == index)
            .and_then(|h| h.0)
    }
}

/// A policy rule that refuses instead of looking up a table (`ip rule add
/// ... prohibit`), as far as `explain` tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusingRule {
    /// IPv6 or IPv4.
    pub v6: bool,
    /// Priority (`pref`).
    pub priority: Option<u32>,
    /// `blackhole`, `unreachable` or `prohibit`.
    pub action: String,
    /// The destinations it applies to (`to PREFIX`); `None`: all.
    pub to: Option<IpNet>,
    /// Whether it matches on more than the destination (source, mark,
    /// interface, ports...), so that it may not apply to every packet.
    pub narrowed: bool,
}

/// The kernel's answer to `ip route get`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteLookup {
    /// `local`, `unicast`, `unreachable`, `blackhole`, `prohibit`...
    pub kind: String,
    /// The device it leaves through.
    pub oif: Option<u32>,
    /// The next hop, if not on-link.
    pub gateway: Option<IpAddr>,
    /// The source address it would carry.
    pub source: Option<IpAddr>,
    /// The table that decided.
    pub table: u32,
    /// The route's own MTU (`ip route ... mtu N`), if it has one.
    pub mtu: Option<u32>,
}

/// A policy routing rule (`ip rule`), with the fields tapir sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// IPv6 (`ip -6 rule`) or IPv4.
    pub v6: bool,
    /// Priority (`pref`); the kernel picks one below the first rule if absent.
    pub priority: Option<u32>,
    /// The table to look up.
    pub table: u32,
    /// Match packets with this firewall mark...
    pub fwmark: Option<u32>,
    /// ...or, with `invert`, without it (`not fwmark`).
    pub invert: bool,
    /// Ignore routes of this prefix length or shorter (`suppress_prefixlength`).
    pub suppress_prefixlength: Option<u32>,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ip {} rule", if self.v6 { "-6" } else { "-4" })?;
        if let Some(p) = self.priority {
            write!(f, " pref {p}")?;
        }
        if let Some(m) = self.fwmark {
            write!(f, "{} fwmark {m:#x}", if self.invert { " not" } else { "" })?;
        }
        match self.table {
            254 => write!(f, " table main")?,
            t => write!(f, " table {t}")?,
        }
        if let Some(l) = self.suppress_prefixlength {
            write!(f, " suppress_prefixlength {l}")?;
        }
        Ok(())
    }
}

/// A bound rtnetlink socket; `op` names it in an error.
fn route_socket(op: &'static str) -> Result<Socket, NetlinkError> {
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| socket_error(op, e))?;
    socket.bind_auto().map_err(|e| socket_error(op, e))?;
    Ok(socket)
}

fn socket_error(op: &'static str, source: io::Error) -> NetlinkError {
    NetlinkError {
        op,
        target: String::new(),
        source,
        kernel_msg: None,
    }
}

/// Word of changes to the links and addresses of the calling thread's
/// network namespace (the kernel's `RTNLGRP_LINK` and `RTNLGRP_IPV4_IFADDR`
/// / `RTNLGRP_IPV6_IFADDR` messages): for a watcher that looks at the host
/// again when something changed, rather than on a tick. The messages
/// themselves are not read, only that they came: a look after them is a
/// fresh dump (a message lost to a full buffer, `ENOBUFS`, is a change too).
pub struct Changes {
    socket: Socket,
    buf: Vec<u8>,
}

impl Changes {
    /// Joins the groups, non-blocking.
    pub fn open() -> Result<Self, NetlinkError> {
        let op = "socket(NETLINK_ROUTE) for link and address changes";
        let socket = route_socket(op)?;
        let err = |source| socket_error(op, source);
        for group in [
            libc::RTNLGRP_LINK,
            libc::RTNLGRP_IPV4_IFADDR,
            libc::RTNLGRP_IPV6_IFADDR,
        ] {
            socket.add_membership(group).map_err(err)?;
        }
        socket.set_non_blocking(true).map_err(err)?;
        Ok(Self {
            socket,
            buf: vec![0; 16 * 1024],
        })
    }

    /// What to wait on: readable when word of a change came.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.socket)
    }

    /// Reads what came; whether anything did (a change, or word of some
    /// lost: `ENOBUFS`). `Err` if the socket failed otherwise.
    pub fn take(&mut self) -> io::Result<bool> {
        let mut any = false;
        loop {
            match self.socket.recv(&mut &mut self.buf[..], 0) {
                Ok(_) => any = true,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => any = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(any),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A synchronous rtnetlink socket in the calling thread's network namespace.
pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

const NLMSGERR_ATTR_MSG: u16 = 1;

impl Netlink {
    /// Opens an rtnetlink socket.
    pub fn open() -> Result<Self, NetlinkError> {
        let op = "socket(NETLINK_ROUTE)";
        let socket = route_socket(op)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|source| socket_error(op, source))?;
        // Extended acks carry the kernel's explanation ("Nexthop device is not up");
        // capped acks keep error messages short. Both are best effort.
        let _ = socket.set_ext_ack(true);
        let _ = socket.set_cap_ack(true);
        Ok(Self {
            socket,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Sends `msg` and collects the answers until DONE (for dumps) or the ACK.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        op: &'static str,
        target: impl Fn() -> String,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        // Every request that is not a dump asks for an ACK: it is what tells
        // us the answer is complete (a GET answers with one message, then the ACK).
        let flags = if dump { flags } else { flags | NLM_F_ACK };
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        let fail = |source: io::Error, kernel_msg: Option<String>| NetlinkError {
            op,
            target: target(),
            source,
            kernel_msg,
        };
        self.socket.send(&out, 0).map_err(|e| fail(e, None))?;

        let mut answers = Vec::new();
        loop {
            let n = self
                .socket
                .recv(&mut &mut self.buf[..], 0)
                .map_err(|e| fail(e, None))?;
            let mut offset = 0;
            while offset < n {
                let bytes = &self.buf[offset..n];
                let msg =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes).map_err(|e| {
                        fail(
                            io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
                            None,
                        )
                    })?;
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += (len + 3) & !3;
                if msg.header.sequence_number != seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(answers),
                    // The ACK of a request; a dump ends with DONE instead.
                    NetlinkPayload::Error(e) if e.code.is_none() && !dump => return Ok(answers),
                    NetlinkPayload::Error(e) if e.code.is_none() => {}
                    NetlinkPayload::Error(e) => {
                        return Err(fail(e.to_io(), ext_ack_message(&e.header)));
                    }
                    NetlinkPayload::InnerMessage(m) => answers.push(m),
                    _ => {}
                }
            }
        }
    }

    /// Every link in this namespace.
    pub fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        let answers = self.request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
            "RTM_GETLINK",
            || "(dump)".into(),
        )?;
        Ok(answers
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(Link::from_message(l)),
                _ => None,
            })
            .collect())
    }

    /// The link called `name`, or `None`.
    pub fn link(&mut self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        match self.request(RouteNetlinkMessage::GetLink(msg), 0, "RTM_GETLINK", || {
            name.to_owned()
        }) {
            Ok(answers) => Ok(answers.iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(Link::from_message(l)),
                _ => None,
            })),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn set_link(
        &mut self,
        index: u32,
        flags: LinkFlags,
        change: LinkFlags,
        attrs: Vec<LinkAttribute>,
        what: String,
    ) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = flags;
        msg.header.change_mask = change;
        msg.attributes = attrs;
        self.request(
            RouteNetlinkMessage::SetLink(msg),
            NLM_F_ACK,
            "RTM_SETLINK",
            || what.clone(),
        )?;
        Ok(())
    }

    /// `ip link set DEV up|down`.
    pub fn set_up(&mut self, index: u32, up: bool) -> Result<(), NetlinkError> {
        let flags = if up {
            LinkFlags::Up
        } else {
            LinkFlags::empty()
        };
        let what = format!("{} (ifindex {index})", if up { "up" } else { "down" });
        self.set_link(index, flags, LinkFlags::Up, vec![], what)
    }

    /// `ip link set DEV promisc on|off`.
    pub fn set_promisc(&mut self, index: u32, on: bool) -> Result<(), NetlinkError> {
        let flags = if on {
            LinkFlags::Promisc
        } else {
            LinkFlags::empty()
        };
        let what = format!(
            "promisc {} (ifindex {index})",
            if on { "on" } else { "off" }
        );
        self.set_link(index, flags, LinkFlags::Promisc, vec![], what)
    }

    /// `ip link set DEV mtu N`.
    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        let what = format!("mtu {mtu} (ifindex {index})");
        self.set_link(
            index,
            LinkFlags::empty(),
            LinkFlags::empty(),
            vec![LinkAttribute::Mtu(mtu)],
            what,
        )
    }

    /// `ip link set DEV address MAC`.
    pub fn set_mac(&mut self, index: u32, mac: [u8; 6]) -> Result<(), NetlinkError> {
        let what = format!(
            "address {} (ifindex {index})",
            mac.map(|b| format!("{b:02x}")).join(":")
        );
        self.set_link(
            index,
            LinkFlags::empty(),
            LinkFlags::empty(),
            vec![LinkAttribute::Address(mac.to_vec())],
            what,
        )
    }

    /// `ip link set DEV master BRIDGE` (`Some`), or `nomaster` (`None`).
    pub fn set_master(&mut self, index: u32, master: Option<u32>) -> Result<(), NetlinkError> {
        let what = match master {
            Some(m) => format!("master ifindex {m} (ifindex {index})"),
            None => format!("nomaster (ifindex {index})"),
        };
        self.set_link(
            index,
            LinkFlags::empty(),
            LinkFlags::empty(),
            vec![LinkAttribute::Controller(master.unwrap_or(0))],
            what,
        )
    }

    /// `ip link add NAME type bridge`; returns its index. Fails if it exists.
    pub fn add_bridge(&mut self, name: &str) -> Result<u32, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        msg.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Bridge,
            )]));
        self.request(
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            "RTM_NEWLINK",
            || format!("{name} type bridge"),
        )?;
        let link = self.link(name)?.ok_or_else(|| NetlinkError {
            op: "RTM_GETLINK",
            target: name.to_owned(),
            source: io::Error::from_raw_os_error(libc::ENODEV),
            kernel_msg: Some("the bridge vanished right after it was created".into()),
        })?;
        Ok(link.index)
    }

    /// `ip link del DEV`.
    pub fn del_link(&mut self, index: u32) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.request(
            RouteNetlinkMessage::DelLink(msg),
            NLM_F_ACK,
            "RTM_DELLINK",
            || format!("ifindex {index}"),
        )?;
        Ok(())
    }

    /// The addresses of interface `index` (or of all interfaces).
    pub fn addresses(&mut self, index: Option<u32>) -> Result<Vec<Address>, NetlinkError> {
        let answers = self.request(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
            "RTM_GETADDR",
            || "(dump)".into(),
        )?;
        Ok(answers
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => address_from_message(a),
                _ => None,
            })
            .filter(|a| index.is_none_or(|i| a.index == i))
            .collect())
    }

    fn address_message(index: u32, local: IpNet, peer: Option<IpAddr>) -> AddressMessage {
        let mut msg = AddressMessage::default();
        msg.header.family = family_of(local.addr());
        msg.header.prefix_len = local.prefix_len();
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(local.addr()));
        msg.attributes
            .push(AddressAttribute::Address(peer.unwrap_or(local.addr())));
        msg
    }

    /// `ip addr add LOCAL/LEN [peer PEER] dev DEV`.
    pub fn add_address(
        &mut self,
        index: u32,
        local: IpNet,
        peer: Option<IpAddr>,
    ) -> Result<(), NetlinkError> {
        let msg = Self::address_message(index, local, peer);
        self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            "RTM_NEWADDR",
            || describe_addr(local, peer, index),
        )?;
        Ok(())
    }

    /// `ip addr del LOCAL/LEN [peer PEER] dev DEV`.
    pub fn del_address(
        &mut self,
        index: u32,
        local: IpNet,
        peer: Option<IpAddr>,
    ) -> Result<(), NetlinkError> {
        let msg = Self::address_message(index, local, peer);
        self.request(
            RouteNetlinkMessage::DelAddress(msg),
            NLM_F_ACK,
            "RTM_DELADDR",
            || describe_addr(local, peer, index),
        )?;
        Ok(())
    }

    /// Routes of the main table through interface `index` (or all), IPv4 and IPv6.
    pub fn routes(&mut self, index: Option<u32>) -> Result<Vec<Route>, NetlinkError> {
        Ok(self
            .all_routes()?
            .into_iter()
            .filter(|r| r.table == u32::from(RouteHeader::RT_TABLE_MAIN))
            .filter(|r| index.is_none_or(|i| r.oif == Some(i)))
            .collect())
    }

    /// Routes that send packets out of interface `index` (of any: `None`),
    /// in every table but the kernel's local one: through it alone, or as
    /// one path of a multipath route.
    pub fn routes_out_of(&mut self, index: Option<u32>) -> Result<Vec<Route>, NetlinkError> {
        Ok(self
            .all_routes()?
            .into_iter()
            .filter(|r| r.table != LOCAL_TABLE && r.kind == "unicast")
            .filter(|r| index.is_none_or(|i| r.through(i)))
            .collect())
    }

    /// Every route of every table (`ip route show table all`), IPv4 and IPv6.
    pub fn routes_all(&mut self) -> Result<Vec<Route>, NetlinkError> {
        self.all_routes()
    }

    /// Routes of table `table`, IPv4 and IPv6.
    pub fn routes_in(&mut self, table: u32) -> Result<Vec<Route>, NetlinkError> {
        Ok(self
            .all_routes()?
            .into_iter()
            .filter(|r| r.table == table)
            .collect())
    }

    /// Every route of every table, IPv4 and IPv6.
    fn all_routes(&mut self) -> Result<Vec<Route>, NetlinkError> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family;
            let answers = self.request(
                RouteNetlinkMessage::GetRoute(msg),
                NLM_F_DUMP,
                "RTM_GETROUTE",
                || "(dump)".into(),
            )?;
            out.extend(answers.iter().filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => route_from_message(r),
                _ => None,
            }));
        }
        Ok(out)
    }

    fn route_message(index: u32, dst: IpNet, via: Option<IpAddr>) -> RouteMessage {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family_of(dst.addr());
        msg.header.destination_prefix_length = dst.prefix_len();
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.scope = if via.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        msg.header.kind = RouteType::Unicast;
        if dst.prefix_len() > 0 {
            msg.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(
                    dst.network(),
                )));
        }
        if let Some(gw) = via {
            msg.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
        }
        msg.attributes.push(RouteAttribute::Oif(index));
        msg
    }

    /// `ip route add DST via GW dev DEV onlink`: the gateway taken to be on
    /// the link with no route to it, as the peer of a point-to-point
    /// address is (whose IPv6 route the kernel makes only once the device
    /// is up and the address checked: "No route to host" before).
    pub fn add_route_onlink(
        &mut self,
        index: u32,
        dst: IpNet,
        via: IpAddr,
    ) -> Result<(), NetlinkError> {
        let mut msg = Self::route_message(index, dst, Some(via));
        msg.header.flags = RouteFlags::Onlink;
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            "RTM_NEWROUTE",
            || format!("{} onlink", describe_route(dst, Some(via), index)),
        )?;
        Ok(())
    }

    /// `ip route add DST [via GW] dev DEV` (main table, protocol boot).
    pub fn add_route(
        &mut self,
        index: u32,
        dst: IpNet,
        via: Option<IpAddr>,
    ) -> Result<(), NetlinkError> {
        let msg = Self::route_message(index, dst, via);
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            "RTM_NEWROUTE",
            || describe_route(dst, via, index),
        )?;
        Ok(())
    }

    /// `ip route del DST [via GW] dev DEV`.
    pub fn del_route(
        &mut self,
        index: u32,
        dst: IpNet,
        via: Option<IpAddr>,
    ) -> Result<(), NetlinkError> {
        self.delete_route(index, dst, via, None)
    }

    /// `ip route del DST dev DEV table TABLE`.
    pub fn del_route_in(&mut self, index: u32, dst: IpNet, table: u32) -> Result<(), NetlinkError> {
        self.delete_route(index, dst, None, Some(table))
    }

    fn delete_route(
        &mut self,
        index: u32,
        dst: IpNet,
        via: Option<IpAddr>,
        table: Option<u32>,
    ) -> Result<(), NetlinkError> {
        let mut msg = Self::route_message(index, dst, via);
        if let Some(t) = table {
            Self::in_table(&mut msg, t);
        }
        // Match whatever scope and protocol the route has, as `ip route del` does.
        msg.header.scope = RouteScope::NoWhere;
        msg.header.protocol = RouteProtocol::Unspec;
        self.request(
            RouteNetlinkMessage::DelRoute(msg),
            NLM_F_ACK,
            "RTM_DELROUTE",
            || match table {
                Some(t) => format!("{} table {t}", describe_route(dst, via, index)),
                None => describe_route(dst, via, index),
            },
        )?;
        Ok(())
    }

    /// Puts a route message in table `table`.
    fn in_table(msg: &mut RouteMessage, table: u32) {
        msg.header.table = u8::try_from(table).unwrap_or(0);
        msg.attributes.push(RouteAttribute::Table(table));
    }
}

impl Netlink {
    /// The policy routing rules, IPv4 then IPv6, as far as [`Rule`] tells them.
    pub fn rules(&mut self) -> Result<Vec<Rule>, NetlinkError> {
        let mut out = Vec::new();
        for r in self.rule_messages()? {
            let mut rule = Rule {
                v6: r.header.family == AddressFamily::Inet6,
                priority: None,
                table: u32::from(r.header.table),
                fwmark: None,
                invert: r.header.flags.contains(RuleFlags::Invert),
                suppress_prefixlength: None,
            };
            for a in &r.attributes {
                match a {
                    RuleAttribute::Priority(p) => rule.priority = Some(*p),
                    RuleAttribute::Table(t) => rule.table = *t,
                    RuleAttribute::FwMark(m) => rule.fwmark = Some(*m),
                    // The kernel reports "no suppression" as 0xffffffff.
                    RuleAttribute::SuppressPrefixLen(l) if *l != u32::MAX => {
                        rule.suppress_prefixlength = Some(*l)
                    }
                    _ => {}
                }
            }
            out.push(rule);
        }
        Ok(out)
    }

    /// The policy rules that refuse (`blackhole`, `unreachable`,
    /// `prohibit`) instead of naming a table, IPv4 then IPv6.
    pub fn refusing_rules(&mut self) -> Result<Vec<RefusingRule>, NetlinkError> {
        let mut out = Vec::new();
        for r in self.rule_messages()? {
            let action = match r.header.action {
                RuleAction::Blackhole => "blackhole",
                RuleAction::Unreachable => "unreachable",
                RuleAction::Prohibit => "prohibit",
                _ => continue,
            };
            let mut rule = RefusingRule {
                v6: r.header.family == AddressFamily::Inet6,
                priority: None,
                action: action.into(),
                to: None,
                narrowed: r.header.src_len > 0
                    || r.header.tos > 0
                    || r.header.flags.contains(RuleFlags::Invert),
            };
            for a in &r.attributes {
                match a {
                    RuleAttribute::Priority(p) => rule.priority = Some(*p),
                    RuleAttribute::Destination(d) => {
                        rule.to = IpNet::new(*d, r.header.dst_len).ok();
                    }
                    RuleAttribute::Source(_)
                    | RuleAttribute::Iifname(_)
                    | RuleAttribute::Oifname(_)
                    | RuleAttribute::UidRange(_)
                    | RuleAttribute::IpProtocol(_)
                    | RuleAttribute::SourcePortRange(_)
                    | RuleAttribute::DestinationPortRange(_)
                    | RuleAttribute::Realm(_)
                    | RuleAttribute::TunId(_) => rule.narrowed = true,
                    RuleAttribute::FwMark(m) if *m != 0 => rule.narrowed = true,
                    _ => {}
                }
            }
            out.push(rule);
        }
        Ok(out)
    }

    /// Every policy rule as the kernel dumps it, IPv4 then IPv6.
    fn rule_messages(&mut self) -> Result<Vec<RuleMessage>, NetlinkError> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RuleMessage::default();
            msg.header.family = family;
            let answers = self.request(
                RouteNetlinkMessage::GetRule(msg),
                NLM_F_DUMP,
                "RTM_GETRULE",
                || "(dump)".into(),
            )?;
            out.extend(answers.into_iter().filter_map(|m| match m {
                RouteNetlinkMessage::NewRule(r) => Some(r),
                _ => None,
            }));
        }
        Ok(out)
    }

    fn rule_message(rule: &Rule) -> RuleMessage {
        let mut msg = RuleMessage::default();
        msg.header.family = if rule.v6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        msg.header.table = u8::try_from(rule.table).unwrap_or(0);
        msg.header.action = RuleAction::ToTable;
        if rule.invert {
            msg.header.flags = RuleFlags::Invert;
        }
        msg.attributes.push(RuleAttribute::Table(rule.table));
        if let Some(p) = rule.priority {
            msg.attributes.push(RuleAttribute::Priority(p));
        }
        if let Some(m) = rule.fwmark {
            msg.attributes.push(RuleAttribute::FwMark(m));
        }
        if let Some(l) = rule.suppress_prefixlength {
            msg.attributes.push(RuleAttribute::SuppressPrefixLen(l));
        }
        msg
    }

    /// `ip rule add ...`.
    pub fn add_rule(&mut self, rule: &Rule) -> Result<(), NetlinkError> {
        self.request(
            RouteNetlinkMessage::NewRule(Self::rule_message(rule)),
            NLM_F_ACK | NLM_F_CREATE,
            "RTM_NEWRULE",
            || rule.to_string(),
        )?;
        Ok(())
    }

    /// `ip rule del ...`: the first rule that matches.
    pub fn del_rule(&mut self, rule: &Rule) -> Result<(), NetlinkError> {
        self.request(
            RouteNetlinkMessage::DelRule(Self::rule_message(rule)),
            NLM_F_ACK,
            "RTM_DELRULE",
            || rule.to_string(),
        )?;
        Ok(())
    }

    /// `ip route add DST dev DEV table TABLE`.
    pub fn add_route_in(&mut self, index: u32, dst: IpNet, table: u32) -> Result<(), NetlinkError> {
        let mut msg = Self::route_message(index, dst, None);
        Self::in_table(&mut msg, table);
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            "RTM_NEWROUTE",
            || format!("{} table {table}", describe_route(dst, None, index)),
        )?;
        Ok(())
    }

    /// How the kernel would route a packet to `dst` (`ip route get DST`):
    /// the kind (`local`, `unicast`, `broadcast`, and for the routes that
    /// refuse, `blackhole`, `prohibit`, `unreachable`), the device, the
    /// gateway, the source address it would use, and the table that
    /// decided (policy rules included, as `ip route get` asks). `None` when
    /// the kernel has no route at all (ENETUNREACH).
    pub fn route_to(&mut self, dst: IpAddr) -> Result<Option<RouteLookup>, NetlinkError> {
        self.route_marked(dst, 0)
    }

    /// [`Netlink::route_to`] for a packet carrying firewall mark `mark`
    /// (0: none), as policy rules see it (`ip route get DST mark M`).
    pub fn route_marked(
        &mut self,
        dst: IpAddr,
        mark: u32,
    ) -> Result<Option<RouteLookup>, NetlinkError> {
        self.route_lookup(dst, mark, None)
    }

    /// [`Netlink::route_to`] out of interface `oif` (`ip route get DST oif
    /// DEV`): a link-local address with its zone.
    pub fn route_out_of(
        &mut self,
        dst: IpAddr,
        oif: u32,
    ) -> Result<Option<RouteLookup>, NetlinkError> {
        self.route_lookup(dst, 0, Some(oif))
    }

    fn route_lookup(
        &mut self,
        dst: IpAddr,
        mark: u32,
        oif: Option<u32>,
    ) -> Result<Option<RouteLookup>, NetlinkError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family_of(dst);
        msg.header.destination_prefix_length = if dst.is_ipv4() { 32 } else { 128 };
        msg.header.flags = RouteFlags::LookupTable;
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(dst)));
        if mark != 0 {
            msg.attributes.push(RouteAttribute::Mark(mark));
        }
        if let Some(i) = oif {
            msg.attributes.push(RouteAttribute::Oif(i));
        }
        // The routes that refuse answer as an errno, which names them.
        let refused = |kind: &str| {
            Ok(Some(RouteLookup {
                kind: kind.to_owned(),
                oif: None,
                gateway: None,
                source: None,
                table: 0,
                mtu: None,
            }))
        };
        let answers = match self.request(
            RouteNetlinkMessage::GetRoute(msg),
            0,
            "RTM_GETROUTE",
            || dst.to_string(),
        ) {
            Ok(a) => a,
            Err(e) => match e.errno() {
                Some(libc::ENETUNREACH) => return Ok(None),
                Some(libc::EHOSTUNREACH) => return refused("unreachable"),
                Some(libc::EINVAL) => return refused("blackhole"),
                Some(libc::EACCES) => return refused("prohibit"),
                _ => return Err(e),
            },
        };
        Ok(answers.iter().find_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r) => {
                let mut l = RouteLookup {
                    kind: format!("{:?}", r.header.kind).to_lowercase(),
                    oif: None,
                    gateway: None,
                    source: None,
                    table: u32::from(r.header.table),
                    mtu: None,
                };
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Oif(i) => l.oif = Some(*i),
                        RouteAttribute::Gateway(g) => l.gateway = route_addr(g),
                        RouteAttribute::PrefSource(s) => l.source = route_addr(s),
                        RouteAttribute::Table(t) => l.table = *t,
                        RouteAttribute::Metrics(m) => {
                            l.mtu = m.iter().find_map(|m| match m {
                                netlink_packet_route::route::RouteMetric::Mtu(v) => Some(*v),
                                _ => None,
                            })
                        }
                        _ => {}
                    }
                }
                Some(l)
            }
            _ => None,
        }))
    }

    /// Whether routing table `table` holds any route (IPv4 or IPv6).
    pub fn table_in_use(&mut self, table: u32) -> Result<bool, NetlinkError> {
        Ok(self.all_routes()?.iter().any(|r| r.table == table))
    }
}

fn describe_addr(local: IpNet, peer: Option<IpAddr>, index: u32) -> String {
    match peer {
        Some(p) => format!("{local} peer {p} (ifindex {index})"),
        None => format!("{local} (ifindex {index})"),
    }
}

fn describe_route(dst: IpNet, via: Option<IpAddr>, index: u32) -> String {
    match via {
        Some(g) => format!("{dst} via {g} (ifindex {index})"),
        None => format!("{dst} (ifindex {index})"),
    }
}

fn family_of(addr: IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn address_from_message(msg: &AddressMessage) -> Option<Address> {
    let mut local = None;
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(a) => local = Some(*a),
            AddressAttribute::Address(a) => address = Some(*a),
            _ => {}
        }
    }
    let len = msg.header.prefix_len;
    // IPv4 point-to-point: IFA_LOCAL is ours, IFA_ADDRESS the peer. IPv6 sends
    // only IFA_ADDRESS unless a peer was given.
    let (mine, peer) = match (local, address) {
        (Some(l), Some(a)) if l != a => (l, Some(a)),
        (Some(l), _) => (l, None),
        (None, Some(a)) => (a, None),
        (None, None) => return None,
    };
    Some(Address {
        index: msg.header.index,
        local: IpNet::new(mine, len).ok()?,
        peer: peer.and_then(|p| IpNet::new(p, len).ok()),
        scope: scope_name(format!("{:?}", msg.header.scope)),
    })
}

fn route_from_message(msg: &RouteMessage) -> Option<Route> {
    let h = &msg.header;
    let mut dst = None;
    let mut gateway = None;
    let mut oif = None;
    let mut table = u32::from(h.table);
    let mut metric = None;
    let mut nexthops = Vec::new();
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(a) => dst = route_addr(a),
            RouteAttribute::Gateway(a) => gateway = route_addr(a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Priority(p) => metric = Some(*p),
            RouteAttribute::MultiPath(hops) => {
                nexthops = hops
                    .iter()
                    .map(|h| {
                        let via = h.attributes.iter().find_map(|a| match a {
                            RouteAttribute::Gateway(g) => route_addr(g),
                            _ => None,
                        });
                        (via, h.interface_index)
                    })
                    .collect();
            }
            _ => {}
        }
    }
    let unspecified = match h.address_family {
        AddressFamily::Inet => IpAddr::from([0u8; 4]),
        AddressFamily::Inet6 => IpAddr::from([0u8; 16]),
        _ => return None,
    };
    Some(Route {
        dst: IpNet::new(dst.unwrap_or(unspecified), h.destination_prefix_length).ok()?,
        gateway,
        oif,
        table,
        protocol: format!("{:?}", h.protocol).to_lowercase(),
        scope: scope_name(format!("{:?}", h.scope)),
        metric,
        kind: format!("{:?}", h.kind).to_lowercase(),
        nexthops,
    })
}

/// Scope names as iproute2 prints them (`global`, not `universe`).
fn scope_name(debug: String) -> String {
    match debug.to_lowercase().as_str() {
        "universe" => "global".into(),
        "nowhere" => "nowhere".into(),
        other => other.into(),
    }
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// Finds the kernel's `NLMSGERR_ATTR_MSG` in an error's payload: with
/// `NETLINK_CAP_ACK` the payload is the request's 16-byte header, then TLVs.
fn ext_ack_message(payload: &[u8]) -> Option<String> {
    let mut tlvs = payload.get(16..)?;
    while tlvs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([tlvs[0], tlvs[1]]));
        let kind = u16::from_ne_bytes([tlvs[2], tlvs[3]]);
        if len < 4 || len > tlvs.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let text = &tlvs[4..len];
            let text = text.split(|&b| b == 0).next().unwrap_or(text);
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        let step = ((len + 3) & !3).min(tlvs.len());
        tlvs = &tlvs[step..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tun_info_decodes_what_the_kernel_sends() {
        // IFLA_INFO_DATA of `ip tuntap add tt0 mode tap user 65534 multi_queue vnet_hdr`
        // on Linux 6.18, as attribute (type, value) pairs.
        let attrs: Vec<(u16, Vec<u8>)> = vec![
            (IFLA_TUN_OWNER, 65534u32.to_ne_bytes().to_vec()),
            (IFLA_TUN_TYPE, vec![2]),
            (IFLA_TUN_PI, vec![0]),
            (IFLA_TUN_VNET_HDR, vec![1]),
            (IFLA_TUN_PERSIST, vec![1]),
            (IFLA_TUN_MULTI_QUEUE, vec![1]),
            (IFLA_TUN_NUM_QUEUES, 0u32.to_ne_bytes().to_vec()),
            (IFLA_TUN_NUM_DISABLED_QUEUES, 0u32.to_ne_bytes().to_vec()),
            (42, vec![7, 7]),
        ];
        let info = TunInfo::from_attrs(attrs.iter().map(|(k, v)| (*k, v.as_slice())));
        assert_eq!(info.mode, Some(Mode::Tap));
        assert!(info.vnet_hdr && info.multi_queue && info.persist && !info.packet_info);
        assert_eq!(info.owner, Some(65534));
        assert_eq!(info.group, None);
        assert_eq!(info.queues, Some(0));
        assert_eq!(
            info.other,
            vec![(42, vec![7, 7])],
            "unknown attributes are kept"
        );
    }

    #[test]
    fn ext_ack_text_is_found() {
        let mut payload = vec![0u8; 16];
        let msg = b"Nexthop device is not up\0";
        let len = (4 + msg.len()) as u16;
        payload.extend_from_slice(&len.to_ne_bytes());
        payload.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        payload.extend_from_slice(msg);
        assert_eq!(
            ext_ack_message(&payload).as_deref(),
            Some("Nexthop device is not up")
        );
        assert_eq!(ext_ack_message(&payload[..10]), None);
        assert_eq!(
            ext_ack_message(&[0; 20]),
            None,
            "a zero length ends the walk"
        );
    }
}
