//! `tapir dev`: persistent tun/tap devices and their configuration.
//!
//! ```text
//!   flags ──▶ AddRequest / SetRequest (validated, no kernel call yet)
//!               │
//!               ├─ add: look the name up (netlink) ─ exists? compare, refuse or --exist-ok
//!               │       └─ TUNSETIFF(EXCL) → OWNER → GROUP → PERSIST   (close = undo)
//!               └─ set: snapshot (link, addresses, routes) → plan of steps, each with its undo
//!                       └─ apply in order; on failure undo what was applied, newest first
//! ```
//!
//! Every command changes tun/tap devices only: `del` and `set` refuse any
//! other kind of link, so a typo cannot take down `eth0`.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::Serialize;
use tapir_sys::{
    Address, IfName, Link, MAIN_TABLE, Mode, NameError, Netlink, NetlinkError, Route, TunDevice,
    TunError, TunInfo, TunOptions,
};

use crate::{caps, users};

/// A `tapir dev` failure, phrased for the person at the keyboard.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevError {
    /// A bad interface name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// This process may not do it.
    #[error("{0}")]
    Permission(String),
    /// No such device.
    #[error(
        "no device named {0} in this network namespace (tapir dev list shows the tun/tap devices)"
    )]
    NotFound(String),
    /// The device is not a tun/tap device.
    #[error(
        "{name} is a {kind} device, not tun/tap: tapir dev works on tun/tap devices only (ip link for others; tapir explain {name} describes any link)"
    )]
    NotTun {
        /// Its name.
        name: String,
        /// Its `IFLA_INFO_KIND`, or `physical`.
        kind: String,
    },
    /// `add` of a device that exists just as asked.
    #[error(
        "{0} already exists with the requested mode and flags; nothing was changed (--exist-ok makes this a success)"
    )]
    Exists(String),
    /// `add` of a device that exists otherwise.
    #[error(
        "{name} already exists with other settings ({diff}); nothing was changed: delete it first (tapir dev del {name}) or ask for the same settings"
    )]
    Conflict {
        /// Its name.
        name: String,
        /// What differs, as `wanted X, has Y` items.
        diff: String,
    },
    /// Input that makes no sense, found before anything was changed.
    #[error("{0}; nothing was changed")]
    Invalid(String),
    /// A failure while running (after the request was accepted).
    #[error("{0}")]
    Runtime(String),
    /// The tun side failed.
    #[error(transparent)]
    Tun(#[from] TunError),
    /// A netlink request failed before anything was changed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// A `set` step failed after others had been applied; they were undone.
    #[error("{device}: {step} failed: {reason}; {rollback}", reason = cause.reason())]
    SetFailed {
        /// The device.
        device: String,
        /// The step that failed, e.g. `add address 10.0.0.1/24`.
        step: String,
        /// Why.
        cause: Box<NetlinkError>,
        /// What became of the steps already applied.
        rollback: String,
    },
}

fn require_net_admin(what: &str) -> Result<(), DevError> {
    if caps::has_net_admin() {
        Ok(())
    } else {
        Err(DevError::Permission(caps::net_admin_missing(what)))
    }
}

fn kind_of(link: &Link) -> String {
    link.kind
        .clone()
        .unwrap_or_else(|| "physical (or loopback)".into())
}

/// Looks up `name` and insists that it is a tun/tap device.
fn tun_link(nl: &mut Netlink, name: &IfName) -> Result<Link, DevError> {
    let link = nl
        .link(name.as_str())?
        .ok_or_else(|| DevError::NotFound(name.to_string()))?;
    if !link.is_tun() {
        return Err(DevError::NotTun {
            name: name.to_string(),
            kind: kind_of(&link),
        });
    }
    Ok(link)
}

/// What `tapir dev add` was asked for, checked.
#[derive(Debug, Clone)]
pub struct AddRequest {
    /// Name or template (`tap%d`).
    pub name: IfName,
    /// Mode and flags.
    pub options: TunOptions,
    /// Owner uid.
    pub owner: Option<u32>,
    /// Owner gid.
    pub group: Option<u32>,
    /// Succeed when an identical device exists.
    pub exist_ok: bool,
    /// The clone device.
    pub tun_path: PathBuf,
}

impl AddRequest {
    /// Validates the command-line values; no kernel call.
    pub fn new(
        name: Option<&str>,
        mode: Mode,
        user: Option<&str>,
        group: Option<&str>,
        flags: (bool, bool, bool),
        exist_ok: bool,
        tun_path: PathBuf,
    ) -> Result<Self, DevError> {
        let name = match name {
            Some(n) => IfName::new(n)?,
            None => IfName::new(&format!("{mode}%d"))?,
        };
        let (packet_info, vnet_hdr, multi_queue) = flags;
        Ok(Self {
            name,
            options: TunOptions {
                mode,
                packet_info,
                vnet_hdr,
                multi_queue,
            },
            owner: user
                .map(users::uid)
                .transpose()
                .map_err(DevError::Invalid)?,
            group: group
                .map(users::gid)
                .transpose()
                .map_err(DevError::Invalid)?,
            exist_ok,
            tun_path,
        })
    }

    /// How an existing device differs from this request; empty if it matches.
    pub fn differences(&self, info: &TunInfo) -> Vec<String> {
        let mut diff = Vec::new();
        let o = &self.options;
        if info.mode != Some(o.mode) {
            diff.push(format!(
                "wanted mode {}, has {}",
                o.mode,
                info.mode.map_or("unknown", Mode::as_str)
            ));
        }
        let mut flag = |what: &str, want: bool, has: bool| {
            if want != has {
                diff.push(format!(
                    "wanted {}{what}, has {}",
                    if want { "" } else { "no " },
                    if has { "it" } else { "not" }
                ));
            }
        };
        flag("pi", o.packet_info, info.packet_info);
        flag("vnet_hdr", o.vnet_hdr, info.vnet_hdr);
        flag("multi_queue", o.multi_queue, info.multi_queue);
        flag("persist", true, info.persist);
        let id = |v: Option<u32>| v.map_or("none".to_string(), |n| n.to_string());
        if self.owner != info.owner {
            diff.push(format!(
                "wanted user {}, has {}",
                id(self.owner),
                id(info.owner)
            ));
        }
        if self.group != info.group {
            diff.push(format!(
                "wanted group {}, has {}",
                id(self.group),
                id(info.group)
            ));
        }
        diff
    }
}

/// The result of `add`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Added {
    /// A new device, with the kernel's name for it.
    Created(IfName),
    /// It was already there, as asked (`--exist-ok`).
    Existed(IfName),
}

/// `tapir dev add`: creates a persistent device, as `ip tuntap add` would.
pub fn add(req: &AddRequest) -> Result<Added, DevError> {
    require_net_admin("creating a tun/tap device")?;
    let mut nl = Netlink::open()?;
    if !req.name.is_template() {
        if let Some(link) = nl.link(req.name.as_str())? {
            let Some(info) = link.tun.as_ref().filter(|_| link.is_tun()) else {
                // (Not "delete it first": dev del deletes tun/tap devices only.)
                return Err(DevError::Invalid(format!(
                    "{} already exists and is a {} device, not tun/tap: choose another name",
                    req.name,
                    kind_of(&link)
                )));
            };
            let diff = req.differences(info);
            if !diff.is_empty() {
                return Err(DevError::Conflict {
                    name: req.name.to_string(),
                    diff: diff.join("; "),
                });
            }
            if req.exist_ok {
                return Ok(Added::Existed(req.name.clone()));
            }
            return Err(DevError::Exists(req.name.to_string()));
        }
    }
    // Until TUNSETPERSIST succeeds, closing the descriptor removes the device,
    // so any failure below leaves nothing behind.
    let dev = TunDevice::create(&req.tun_path, &req.name, req.options)?;
    if let Some(uid) = req.owner {
        dev.set_owner(uid)?;
    }
    if let Some(gid) = req.group {
        dev.set_group(gid)?;
    }
    dev.set_persist(true)?;
    Ok(Added::Created(dev.name().clone()))
}

/// What `del` removed: the device and whether a process still had it open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deleted {
    /// The device.
    pub name: String,
    /// Queues that processes had attached at the time.
    pub attached_queues: u32,
}

/// Whether a process has the device open: multi-queue devices count their
/// queues; single-queue devices have carrier exactly while attached.
fn is_open(link: &Link) -> bool {
    match link.tun.as_ref() {
        Some(t) if t.multi_queue => t.queues.unwrap_or(0) + t.disabled_queues.unwrap_or(0) > 0,
        _ => link.carrier,
    }
}

/// Whether tun/tap device `name` is open in a process, of any namespace
/// (`false` if there is no such device).
pub fn is_held(name: &str) -> bool {
    let Ok(name) = IfName::new(name) else {
        return false;
    };
    Netlink::open()
        .ok()
        .and_then(|mut nl| tun_link(&mut nl, &name).ok())
        .is_some_and(|l| is_open(&l))
}

/// `tapir dev del`: removes a tun/tap device, and nothing else.
pub fn del(name: &str, force: bool) -> Result<Deleted, DevError> {
    let name = IfName::new(name)?;
    if !caps::has_net_admin() {
        return del_as_owner(&name, force);
    }
    let mut nl = Netlink::open()?;
    let link = tun_link(&mut nl, &name)?;
    // One a program holds (a VM's tap, a tunnel's device) is not pulled
    // from under it unasked, as `ip tuntap del` refuses it ("Device or
    // resource busy"): it went, and the program with it.
    let open = open_queues(&link);
    if open > 0 && !force {
        return Err(DevError::Invalid(format!(
            "{name} is open in {} ({open} queue(s)): stop that program first (a tunnel: tapir down), or delete it from under it with --force",
            holders_named(&link.name)
        )));
    }
    nl.del_link(link.index)?;
    Ok(Deleted {
        name: link.name.clone(),
        attached_queues: open_queues(&link),
    })
}

/// How many queues processes have open: detached ones too
/// (IFF_DETACH_QUEUE), whose holder loses the device all the same.
pub fn open_queues(link: &Link) -> u32 {
    if is_open(link) {
        link.tun
            .as_ref()
            .and_then(|t| Some(t.queues? + t.disabled_queues.unwrap_or(0)))
            .unwrap_or(1)
    } else {
        0
    }
}

/// Whether this process may attach to a device without CAP_NET_ADMIN.
pub fn ours(info: &tapir_sys::netlink::TunInfo) -> bool {
    let groups: Vec<u32> = nix::unistd::getgroups()
        .unwrap_or_default()
        .iter()
        .map(|g| g.as_raw())
        .chain([nix::unistd::getegid().as_raw()])
        .collect();
    may_attach(info, nix::unistd::geteuid().as_raw(), &groups)
}

/// The kernel's rule (`tun_not_capable`): the owner, where one is set, must
/// be `uid`, and the group, where one is set, must be among `groups`; a
/// device with neither is open to anyone who can open the clone device.
fn may_attach(info: &tapir_sys::netlink::TunInfo, uid: u32, groups: &[u32]) -> bool {
    info.owner.is_none_or(|o| o == uid) && info.group.is_none_or(|g| groups.contains(&g))
}

/// `dev del` without CAP_NET_ADMIN, as `tunctl -d` and `ip tuntap del` do
/// it for a device's owner (or group): attached to, made not persistent,
/// and so gone once closed. Anyone else is told what it takes, also for a
/// device with neither owner nor group, which the kernel would let anyone
/// attach to and so delete: a device nobody was given is root's to delete.
fn del_as_owner(name: &IfName, force: bool) -> Result<Deleted, DevError> {
    let missing = || DevError::Permission(caps::net_admin_missing("deleting a tun/tap device"));
    let mut nl = Netlink::open()?;
    let link = tun_link(&mut nl, name)?;
    // Held (a multi-queue device lets us attach beside its holder): as
    // with root, not unasked; and, made not persistent, it goes only when
    // its holder lets go.
    let open = open_queues(&link);
    if open > 0 && !force {
        return Err(DevError::Invalid(format!(
            "{name} is open in {} ({open} queue(s)): stop that program first, or give --force, and it goes when that program closes it",
            holders_named(&link.name)
        )));
    }
    let Some(info) = link.tun.as_ref() else {
        return Err(missing());
    };
    let given = info.owner.is_some() || info.group.is_some();
    let Some(mode) = info.mode.filter(|_| given && ours(info)) else {
        return Err(missing());
    };
    let options = TunOptions {
        mode,
        packet_info: info.packet_info,
        vnet_hdr: info.vnet_hdr,
        multi_queue: info.multi_queue,
    };
    let dev = TunDevice::open(std::path::Path::new(tapir_sys::DEFAULT_TUN_PATH), name, options).map_err(|e| {
        DevError::Invalid(format!(
            "{name} is yours, but cannot be attached to delete it ({e}): a process holds it; close it there, or have root delete it from under it (sudo tapir dev del {name} --force)"
        ))
    })?;
    dev.set_persist(false)?;
    drop(dev);
    Ok(Deleted {
        name: link.name.clone(),
        attached_queues: open_queues(&link),
    })
}

/// One tun/tap device as `list`, `show` and `--json` present it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeviceView {
    /// Name.
    pub ifname: String,
    /// Index.
    pub ifindex: u32,
    /// `tun`, `tap`, or `unknown` on kernels before 4.15.
    pub mode: String,
    /// Packet information header.
    pub pi: bool,
    /// virtio-net header.
    pub vnet_hdr: bool,
    /// Multi-queue.
    pub multi_queue: bool,
    /// Persistent.
    pub persist: bool,
    /// Owner.
    pub owner: Option<IdView>,
    /// Group.
    pub group: Option<IdView>,
    /// Administratively up.
    pub up: bool,
    /// Operational state as the kernel reports it.
    pub operstate: String,
    /// Carrier, whether or not the link is up.
    pub carrier: bool,
    /// A process has the device open.
    pub open: bool,
    /// Promiscuous mode.
    pub promisc: bool,
    /// MTU.
    pub mtu: u32,
    /// MAC address (tap).
    pub address: Option<String>,
    /// Queues attached by processes (multi-queue devices only).
    pub queues: Option<u32>,
    /// Queues detached with IFF_DETACH_QUEUE (multi-queue devices only).
    pub disabled_queues: Option<u32>,
    /// Addresses.
    pub addresses: Vec<AddrView>,
    /// Routes through this device, of every table but the local one.
    pub routes: Vec<RouteView>,
    /// tun attributes this version does not know: type and hex value.
    pub unknown_attributes: Vec<(u16, String)>,
    /// The processes (of this network namespace) that hold it open.
    pub holders: Vec<Holder>,
}

/// A process holding a tun/tap device open.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Holder {
    /// Its pid.
    pub pid: i32,
    /// Its command (`/proc/PID/comm`).
    pub command: String,
}

/// The programs of this namespace that hold device `name`, as `dev list`
/// names them (`tapir(11750)`), or "another program".
pub fn holders_named(name: &str) -> String {
    let who: Vec<String> = holders()
        .into_iter()
        .filter(|(n, _)| n == name)
        .map(|(_, h)| format!("{}({})", h.command, h.pid))
        .collect();
    if who.is_empty() {
        "another program".into()
    } else {
        who.join(", ")
    }
}

/// Which processes of this network namespace hold which tun/tap devices:
/// each descriptor of `/dev/net/tun` (or another clone device) says its
/// device in the `iff:` line of `/proc/PID/fdinfo/FD`.
pub fn holders() -> Vec<(String, Holder)> {
    let scope = crate::scope::Scope::current().ok();
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if scope.as_ref().is_some_and(|s| !s.holds(pid)) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let target = std::fs::read_link(fd.path()).unwrap_or_default();
            if !target.to_string_lossy().contains("tun") {
                continue;
            }
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            if let Some(name) = info.lines().find_map(|l| l.strip_prefix("iff:")) {
                let command = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                let h = Holder { pid, command };
                let name = name.trim().to_owned();
                if !out.iter().any(|(n, x)| *n == name && *x == h) {
                    out.push((name, h));
                }
            }
        }
    }
    out
}

/// A uid or gid with its name.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct IdView {
    /// The number.
    pub id: u32,
    /// The name, if the system has one for it.
    pub name: Option<String>,
}

impl std::fmt::Display for IdView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(n) => write!(f, "{n}({})", self.id),
            None => write!(f, "{}", self.id),
        }
    }
}

/// An address.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AddrView {
    /// `inet` or `inet6`.
    pub family: &'static str,
    /// The local address.
    pub local: IpAddr,
    /// Prefix length.
    pub prefixlen: u8,
    /// Point-to-point peer.
    pub peer: Option<IpAddr>,
    /// Scope.
    pub scope: String,
}

/// A route.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RouteView {
    /// Destination.
    pub dst: String,
    /// Gateway.
    pub via: Option<IpAddr>,
    /// Origin: `kernel`, `boot`...
    pub protocol: String,
    /// Scope.
    pub scope: String,
    /// Metric.
    pub metric: Option<u32>,
    /// Its table, when not the main one (a policy rule sends packets
    /// there: wg-quick's full tunnels use one).
    pub table: Option<u32>,
    /// One of the paths of a multipath route.
    pub multipath: bool,
}

fn view(link: &Link, addrs: &[Address], routes: &[Route], held: &[(String, Holder)]) -> DeviceView {
    let tun = link.tun.clone().unwrap_or_default();
    DeviceView {
        holders: held
            .iter()
            .filter(|(n, _)| *n == link.name)
            .map(|(_, h)| h.clone())
            .collect(),
        ifname: link.name.clone(),
        ifindex: link.index,
        mode: tun.mode.map_or("unknown", Mode::as_str).into(),
        pi: tun.packet_info,
        vnet_hdr: tun.vnet_hdr,
        multi_queue: tun.multi_queue,
        persist: tun.persist,
        owner: tun.owner.map(|id| IdView {
            id,
            name: users::user_name(id),
        }),
        group: tun.group.map(|id| IdView {
            id,
            name: users::group_name(id),
        }),
        up: link.state.up,
        operstate: link.operstate.clone(),
        carrier: link.carrier,
        open: is_open(link),
        promisc: link.state.promisc,
        mtu: link.mtu,
        address: link
            .address
            .as_ref()
            .filter(|a| !a.is_empty())
            .map(|a| tapir_wire::summary::mac(a)),
        queues: tun.queues,
        disabled_queues: tun.disabled_queues,
        addresses: addrs
            .iter()
            .filter(|a| a.index == link.index)
            .map(|a| AddrView {
                family: if a.local.addr().is_ipv4() {
                    "inet"
                } else {
                    "inet6"
                },
                local: a.local.addr(),
                prefixlen: a.local.prefix_len(),
                peer: a.peer.map(|p| p.addr()),
                scope: a.scope.clone(),
            })
            .collect(),
        routes: routes
            .iter()
            .filter(|r| r.through(link.index))
            .map(|r| RouteView {
                dst: if r.dst.prefix_len() == 0 {
                    "default".into()
                } else {
                    r.dst.to_string()
                },
                via: r.gateway_on(link.index),
                protocol: r.protocol.clone(),
                scope: r.scope.clone(),
                metric: r.metric,
                table: (r.table != MAIN_TABLE).then_some(r.table),
                multipath: !r.nexthops.is_empty(),
            })
            .collect(),
        unknown_attributes: tun
            .other
            .iter()
            .map(|(k, v)| (*k, v.iter().map(|b| format!("{b:02x}")).collect()))
            .collect(),
    }
}

/// `tapir dev list`: every tun/tap device in this namespace, by index.
pub fn list() -> Result<Vec<DeviceView>, DevError> {
    let mut nl = Netlink::open()?;
    let links = nl.links()?;
    let addrs = nl.addresses(None)?;
    let routes = nl.routes_out_of(None)?;
    let held = holders();
    Ok(links
        .iter()
        .filter(|l| l.is_tun())
        .map(|l| view(l, &addrs, &routes, &held))
        .collect())
}

/// `tapir dev show NAME`.
pub fn show(name: &str) -> Result<DeviceView, DevError> {
    let name = IfName::new(name)?;
    let mut nl = Netlink::open()?;
    let link = tun_link(&mut nl, &name)?;
    let addrs = nl.addresses(Some(link.index))?;
    let routes = nl.routes_out_of(Some(link.index))?;
    Ok(view(&link, &addrs, &routes, &holders()))
}

/// One line per device, for `list`.
pub fn format_list(devs: &[DeviceView]) -> String {
    if devs.is_empty() {
        return "no tun/tap devices (tapir dev add NAME --mode tun creates one)\n".into();
    }
    let mut rows = vec![
        [
            "NAME",
            "MODE",
            "FLAGS",
            "OWNER",
            "GROUP",
            "STATE",
            "MTU",
            "OPEN",
            "ADDRESSES",
        ]
        .map(String::from),
    ];
    for d in devs {
        rows.push([
            d.ifname.clone(),
            d.mode.clone(),
            flag_words(d),
            d.owner.as_ref().map_or("-".into(), ToString::to_string),
            d.group.as_ref().map_or("-".into(), ToString::to_string),
            state_word(d),
            d.mtu.to_string(),
            match (d.open, d.queues) {
                (false, _) => "no".into(),
                (true, Some(n)) => format!("yes({n}){}", holder_words(d)),
                (true, None) => format!("yes{}", holder_words(d)),
            },
            d.addresses
                .iter()
                .map(addr_text)
                .collect::<Vec<_>>()
                .join(" "),
        ]);
    }
    let widths: Vec<usize> = (0..9)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// ` by tapir(812),echo(90)`, or nothing.
fn holder_words(d: &DeviceView) -> String {
    if d.holders.is_empty() {
        return String::new();
    }
    let who: Vec<String> = d
        .holders
        .iter()
        .map(|h| format!("{}({})", h.command, h.pid))
        .collect();
    format!(" by {}", who.join(","))
}

fn flag_words(d: &DeviceView) -> String {
    let mut words = Vec::new();
    if d.persist {
        words.push("persist");
    }
    if d.pi {
        words.push("pi");
    }
    if d.vnet_hdr {
        words.push("vnet_hdr");
    }
    if d.multi_queue {
        words.push("multi_queue");
    }
    if d.promisc {
        words.push("promisc");
    }
    if words.is_empty() {
        "-".into()
    } else {
        words.join(",")
    }
}

fn state_word(d: &DeviceView) -> String {
    match (d.up, d.open) {
        (false, _) => "DOWN".into(),
        (true, true) => "UP".into(),
        (true, false) => "UP,NO-CARRIER".into(),
    }
}

fn addr_text(a: &AddrView) -> String {
    match a.peer {
        Some(p) => format!("{} peer {}/{}", a.local, p, a.prefixlen),
        None => format!("{}/{}", a.local, a.prefixlen),
    }
}

/// The details of one device, for `show`.
pub fn format_show(d: &DeviceView) -> String {
    let mut out = format!("{}: {} device, index {}\n", d.ifname, d.mode, d.ifindex);
    out += &format!("    flags   {}\n", flag_words(d));
    out += &format!(
        "    owner   user {}  group {}\n",
        d.owner.as_ref().map_or("-".into(), ToString::to_string),
        d.group.as_ref().map_or("-".into(), ToString::to_string)
    );
    out += &format!(
        "    state   {} (operstate {}), mtu {}, promisc {}\n",
        state_word(d),
        d.operstate,
        d.mtu,
        if d.promisc { "on" } else { "off" }
    );
    out += &match (d.open, d.queues) {
        (false, _) => "    open    no: no process has it open\n".to_string(),
        (true, Some(n)) => format!(
            "    open    yes: {n} queue(s) attached{}{}\n",
            match d.disabled_queues {
                Some(k) if k > 0 => format!(", {k} detached (IFF_DETACH_QUEUE)"),
                _ => String::new(),
            },
            holder_words(d)
        ),
        (true, None) => format!("    open    yes{}\n", holder_words(d)),
    };
    if d.owner.is_none() && d.group.is_none() && d.persist {
        out += "    note    no owner or group: any user who can open the clone device may attach (tapir dev add --user sets one)\n";
    }
    if let Some(mac) = &d.address {
        out += &format!("    mac     {mac}\n");
    }
    for a in &d.addresses {
        out += &format!("    {:<7} {} scope {}\n", a.family, addr_text(a), a.scope);
    }
    for r in &d.routes {
        let via = r.via.map(|g| format!(" via {g}")).unwrap_or_default();
        let table = r.table.map(|t| format!(" table {t}")).unwrap_or_default();
        let multipath = if r.multipath {
            " (one path of several)"
        } else {
            ""
        };
        out += &format!(
            "    route   {}{via}{table} proto {} scope {}{multipath}\n",
            r.dst, r.protocol, r.scope
        );
    }
    for (kind, value) in &d.unknown_attributes {
        out += &format!("    attr    {kind} = {value} (unknown to this tapir)\n");
    }
    out
}

/// What `tapir dev set` was asked for, parsed.
#[derive(Debug, Clone, Default)]
pub struct SetRequest {
    /// `--up` / `--down`.
    pub up: Option<bool>,
    /// `--mtu`.
    pub mtu: Option<u32>,
    /// `--promisc on|off`.
    pub promisc: Option<bool>,
    /// `--addr CIDR [--peer ADDR]`.
    pub add_addrs: Vec<(IpNet, Option<IpAddr>)>,
    /// `--del-addr CIDR`.
    pub del_addrs: Vec<IpNet>,
    /// `--route CIDR [--via ADDR]`.
    pub add_routes: Vec<(IpNet, Option<IpAddr>)>,
    /// `--del-route CIDR`.
    pub del_routes: Vec<IpNet>,
}

impl SetRequest {
    /// Whether nothing was asked.
    pub fn is_empty(&self) -> bool {
        self.up.is_none()
            && self.mtu.is_none()
            && self.promisc.is_none()
            && self.add_addrs.is_empty()
            && self.del_addrs.is_empty()
            && self.add_routes.is_empty()
            && self.del_routes.is_empty()
    }
}

/// Parses a unicast MAC address (`02:00:00:00:00:01`).
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{s:?} is not a MAC address: write it as 02:00:00:00:00:01"))?;
    let mac: [u8; 6] = bytes.try_into().map_err(|_| {
        format!("{s:?} is not a MAC address: it needs six bytes, as in 02:00:00:00:00:01")
    })?;
    if mac[0] & 1 == 1 {
        return Err(format!(
            "{s} is a multicast address: the first byte must be even"
        ));
    }
    if mac == [0; 6] {
        return Err(format!("{s} is the all-zero address: choose another"));
    }
    Ok(mac)
}

/// Parses an interface address: `10.0.0.1/24`, or a bare address (`/32`, `/128`).
pub fn parse_addr(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    if let Some((addr, prefix)) = s.split_once('/') {
        if let (Ok(a), Ok(p)) = (addr.parse::<IpAddr>(), prefix.parse::<u32>()) {
            let max = if a.is_ipv4() { 32 } else { 128 };
            if p > max {
                return Err(format!(
                    "{s:?}: the prefix /{p} is too long for an {} address (at most /{max})",
                    if a.is_ipv4() { "IPv4" } else { "IPv6" }
                ));
            }
        }
    }
    s.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
        format!(
            "{s:?} is not an address: write it as ADDRESS/PREFIX, e.g. 10.0.0.1/24 or fd00::1/64"
        )
    })
}

/// Parses a route destination: a network (`10.1.0.0/24`), a host, or `default`.
/// Host bits must be clear, as `ip route` demands.
pub fn parse_route(s: &str, v6_default: bool) -> Result<IpNet, String> {
    if s == "default" {
        return Ok(if v6_default {
            "::/0".parse().expect("constant")
        } else {
            "0.0.0.0/0".parse().expect("constant")
        });
    }
    let net = parse_addr(s).map_err(|_| {
        format!(
            "{s:?} is not a route destination: write it as NETWORK/PREFIX (10.1.0.0/24) or default"
        )
    })?;
    if net.network() != net.addr() {
        return Err(format!(
            "route destination {s} has host bits set: did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

/// Parses a single address (`--peer`, `--via`).
pub fn parse_ip(s: &str, what: &str) -> Result<IpAddr, String> {
    s.parse()
        .map_err(|_| format!("{what} {s:?} is not an IP address"))
}

/// One change of `set`, and the change that undoes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Link up or down.
    Up(bool),
    /// MTU.
    Mtu(u32),
    /// Promiscuous mode.
    Promisc(bool),
    /// Add an address.
    AddAddr(IpNet, Option<IpAddr>),
    /// Remove an address.
    DelAddr(IpNet, Option<IpAddr>),
    /// Add a route.
    AddRoute(IpNet, Option<IpAddr>),
    /// Remove a route.
    DelRoute(IpNet, Option<IpAddr>),
}

impl Step {
    /// Applies the step to device `index`, the peers of whose addresses this
    /// set adds are `peers`: an IPv6 route via one of them is made
    /// `onlink`, since the kernel's route to such a peer comes only once the
    /// device is up and the address checked (`--addr fd01::1 --peer fd01::2
    /// --route fd02::/64 --via fd01::2` in one `dev set` failed).
    fn apply(&self, nl: &mut Netlink, index: u32, peers: &[IpAddr]) -> Result<(), NetlinkError> {
        match *self {
            Step::Up(up) => nl.set_up(index, up),
            Step::Mtu(mtu) => nl.set_mtu(index, mtu),
            Step::Promisc(on) => nl.set_promisc(index, on),
            Step::AddAddr(a, p) => nl.add_address(index, a, p),
            Step::DelAddr(a, p) => nl.del_address(index, a, p),
            Step::AddRoute(d, Some(v @ IpAddr::V6(_))) if peers.contains(&v) => {
                nl.add_route_onlink(index, d, v)
            }
            Step::AddRoute(d, v) => nl.add_route(index, d, v),
            Step::DelRoute(d, v) => nl.del_route(index, d, v),
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let peer =
            |p: &Option<IpAddr>, word: &str| p.map(|p| format!(" {word} {p}")).unwrap_or_default();
        match self {
            Step::Up(true) => write!(f, "set up"),
            Step::Up(false) => write!(f, "set down"),
            Step::Mtu(m) => write!(f, "set mtu {m}"),
            Step::Promisc(on) => write!(f, "set promisc {}", if *on { "on" } else { "off" }),
            Step::AddAddr(a, p) => write!(f, "add address {a}{}", peer(p, "peer")),
            Step::DelAddr(a, p) => write!(f, "delete address {a}{}", peer(p, "peer")),
            Step::AddRoute(d, v) => write!(f, "add route {d}{}", peer(v, "via")),
            Step::DelRoute(d, v) => write!(f, "delete route {d}{}", peer(v, "via")),
        }
    }
}

/// The largest MTU the kernel gives a tap (its `max_mtu`).
pub const TAP_MAX_MTU: u32 = 65535 - 14;

/// Turns a request into steps with their undos, checked against the device
/// as it is now. Fails, changing nothing, on anything the kernel would refuse
/// for a reason we can see beforehand.
pub fn plan(
    req: &SetRequest,
    link: &Link,
    addrs: &[Address],
    routes: &[Route],
) -> Result<Vec<(Step, Step)>, DevError> {
    let invalid = |m: String| Err(DevError::Invalid(format!("{}: {m}", link.name)));
    let mut steps = Vec::new();
    if let Some(mtu) = req.mtu {
        if !(68..=65535).contains(&mtu) {
            return invalid(format!(
                "MTU {mtu} is out of range: use 68 to 65535 (1280 or more for IPv6)"
            ));
        }
        let tap = link.tun.as_ref().and_then(|t| t.mode) == Some(Mode::Tap);
        if tap && mtu > TAP_MAX_MTU {
            return invalid(format!(
                "MTU {mtu} is too large for a tap: at most {TAP_MAX_MTU} (65535 less its 14-byte Ethernet header)"
            ));
        }
        let has_v6 = addrs
            .iter()
            .any(|a| a.index == link.index && a.local.addr().is_ipv6())
            || req.add_addrs.iter().any(|(a, _)| a.addr().is_ipv6());
        if mtu < 1280 && has_v6 {
            return invalid(format!(
                "MTU {mtu} is below 1280, the IPv6 minimum, and the kernel would remove the device's IPv6 addresses: use 1280 or more, or remove them first"
            ));
        }
        if mtu != link.mtu {
            steps.push((Step::Mtu(mtu), Step::Mtu(link.mtu)));
        }
    }
    if let Some(on) = req.promisc {
        if on != link.state.promisc {
            steps.push((Step::Promisc(on), Step::Promisc(link.state.promisc)));
        }
    }
    // Up before addresses and routes (the kernel refuses a gateway route on a
    // down link); down after them.
    if req.up == Some(true) && !link.state.up {
        steps.push((Step::Up(true), Step::Up(false)));
    }
    let mut seen = Vec::new();
    for dst in &req.del_routes {
        let Some(r) = routes
            .iter()
            .find(|r| r.oif == Some(link.index) && r.dst == *dst)
        else {
            return invalid(format!(
                "has no route to {dst} (tapir dev show {} lists them)",
                link.name
            ));
        };
        steps.push((
            Step::DelRoute(*dst, r.gateway),
            Step::AddRoute(*dst, r.gateway),
        ));
    }
    for net in &req.del_addrs {
        let Some(a) = addrs
            .iter()
            .find(|a| a.index == link.index && a.local == *net)
        else {
            return invalid(format!(
                "has no address {net} (tapir dev show {} lists them)",
                link.name
            ));
        };
        let peer = a.peer.map(|p| p.addr());
        steps.push((Step::DelAddr(*net, peer), Step::AddAddr(*net, peer)));
    }
    for (net, peer) in &req.add_addrs {
        if let Some(p) = peer {
            if p.is_ipv4() != net.addr().is_ipv4() {
                return invalid(format!(
                    "peer {p} is not of the same family as address {net}"
                ));
            }
        }
        // One that this request deletes first does not count: deleting and
        // adding it again (another prefix) is one all-or-nothing step.
        let exists = addrs.iter().any(|a| {
            a.index == link.index
                && a.local.addr() == net.addr()
                && !req.del_addrs.contains(&a.local)
        });
        if seen.contains(&net.addr()) {
            return invalid(format!("--addr {} is given twice", net.addr()));
        }
        if exists {
            return invalid(format!("already has address {}", net.addr()));
        }
        seen.push(net.addr());
        steps.push((Step::AddAddr(*net, *peer), Step::DelAddr(*net, *peer)));
    }
    for (dst, via) in &req.add_routes {
        if let Some(v) = via {
            if v.is_ipv4() != dst.addr().is_ipv4() {
                return invalid(format!(
                    "gateway {v} is not of the same family as route {dst}"
                ));
            }
        }
        if routes
            .iter()
            .any(|r| r.dst == *dst && r.oif == Some(link.index))
        {
            return invalid(format!("already has a route to {dst}"));
        }
        steps.push((Step::AddRoute(*dst, *via), Step::DelRoute(*dst, *via)));
    }
    if req.up == Some(false) && link.state.up {
        steps.push((Step::Up(false), Step::Up(true)));
    }
    Ok(steps)
}

/// Re-adds addresses and (non-kernel) routes of `before` that are missing now.
/// Returns what could not be put back.
pub fn restore(nl: &mut Netlink, index: u32, addrs: &[Address], routes: &[Route]) -> Vec<String> {
    let mut failed = Vec::new();
    let now_addrs = match nl.addresses(Some(index)) {
        Ok(a) => a,
        Err(e) => return vec![format!("re-reading addresses ({e})")],
    };
    for a in addrs.iter().filter(|a| a.index == index) {
        if !now_addrs
            .iter()
            .any(|n| n.local == a.local && n.peer == a.peer)
        {
            if let Err(e) = nl.add_address(index, a.local, a.peer.map(|p| p.addr())) {
                failed.push(format!(
                    "address {} (restore failed: {})",
                    a.local,
                    e.reason()
                ));
            }
        }
    }
    let now_routes = match nl.routes(Some(index)) {
        Ok(r) => r,
        Err(e) => return vec![format!("re-reading routes ({e})")],
    };
    for r in routes
        .iter()
        .filter(|r| r.protocol != "kernel" && r.oif == Some(index))
    {
        if !now_routes
            .iter()
            .any(|n| n.dst == r.dst && n.gateway == r.gateway)
        {
            if let Err(e) = nl.add_route(index, r.dst, r.gateway) {
                failed.push(format!("route {} (restore failed: {})", r.dst, e.reason()));
            }
        }
    }
    failed
}

/// `tapir dev set`: applies the request, all of it or none of it.
/// Returns the steps that were applied (empty if there was nothing to change).
pub fn set(name: &str, req: &SetRequest) -> Result<(Vec<Step>, Vec<IpNet>), DevError> {
    let name = IfName::new(name)?;
    if req.is_empty() {
        return Err(DevError::Invalid(
            "nothing to set: give --up, --down, --mtu, --promisc, --addr, --del-addr, --route or --del-route".into(),
        ));
    }
    require_net_admin("configuring a device")?;
    let mut nl = Netlink::open()?;
    let link = tun_link(&mut nl, &name)?;
    let addrs = nl.addresses(Some(link.index))?;
    let routes = nl.routes(Some(link.index))?;
    let steps = plan(req, &link, &addrs, &routes)?;
    // The peers of addresses this set adds: those whose route the kernel
    // has yet to make (an address there already has it, on a device that is
    // up; one down takes no onlink route either).
    let peers: Vec<IpAddr> = steps
        .iter()
        .filter_map(|(s, _)| match s {
            Step::AddAddr(_, p) => *p,
            _ => None,
        })
        .collect();
    let mut applied: Vec<&(Step, Step)> = Vec::new();
    for pair in &steps {
        if let Err(source) = pair.0.apply(&mut nl, link.index, &peers) {
            let mut undone = Vec::new();
            let mut failed = Vec::new();
            for (step, undo) in applied.iter().rev() {
                match undo.apply(&mut nl, link.index, &peers) {
                    Ok(()) => undone.push(step.to_string()),
                    Err(e) => failed.push(format!("{step} (undo failed: {e})")),
                }
            }
            // Undoing is not always enough: bringing a link down makes the
            // kernel drop IPv6 addresses, removing the last IPv4 address drops
            // the routes through it. Put back whatever went missing.
            failed.extend(restore(&mut nl, link.index, &addrs, &routes));
            let rollback = if applied.is_empty() {
                "nothing was changed".to_string()
            } else if failed.is_empty() {
                format!("undone: {}; the device is as it was", undone.join(", "))
            } else {
                format!(
                    "undone: {}; COULD NOT UNDO: {}",
                    if undone.is_empty() {
                        "-".into()
                    } else {
                        undone.join(", ")
                    },
                    failed.join(", ")
                )
            };
            return Err(DevError::SetFailed {
                device: link.name.clone(),
                step: pair.0.to_string(),
                cause: Box::new(source),
                rollback,
            });
        }
        applied.push(pair);
    }
    let steps: Vec<Step> = steps.into_iter().map(|(s, _)| s).collect();
    let gone = also_gone(&mut nl, link.index, &addrs, &steps);
    Ok((steps, gone))
}

/// The addresses of `before` that are gone from device `index` though
/// `steps` deleted none of them: a primary IPv4 address takes the
/// secondaries of its prefix with it (unless
/// `net.ipv4.conf.DEV.promote_secondaries` is 1), a link going down its
/// IPv6 addresses. Said, so that nothing goes unseen.
pub fn also_gone(nl: &mut Netlink, index: u32, before: &[Address], steps: &[Step]) -> Vec<IpNet> {
    let Ok(now) = nl.addresses(Some(index)) else {
        return Vec::new();
    };
    before
        .iter()
        .filter(|a| a.index == index && !now.iter().any(|n| n.local == a.local))
        .filter(|a| {
            !steps
                .iter()
                .any(|s| matches!(s, Step::DelAddr(x, _) if *x == a.local))
        })
        .map(|a| a.local)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapir_sys::LinkState;

    #[test]
    fn who_may_attach_is_the_kernels_rule() {
        use tapir_sys::netlink::TunInfo;
        let dev = |owner, group| TunInfo {
            owner,
            group,
            ..TunInfo::default()
        };
        // Neither set: anyone (the helper's `dump` as nobody was refused).
        assert!(may_attach(&dev(None, None), 65534, &[65534]));
        assert!(may_attach(&dev(Some(1000), None), 1000, &[]));
        assert!(!may_attach(&dev(Some(1000), None), 1001, &[1000]));
        assert!(may_attach(&dev(None, Some(27)), 1001, &[5, 27]));
        assert!(!may_attach(&dev(None, Some(27)), 1001, &[5]));
        // Both set: the owner and in the group, not either.
        assert!(may_attach(&dev(Some(1000), Some(27)), 1000, &[27]));
        assert!(!may_attach(&dev(Some(1000), Some(27)), 1000, &[5]));
        assert!(!may_attach(&dev(Some(1000), Some(27)), 1001, &[27]));
    }

    fn tun0(up: bool) -> Link {
        Link {
            index: 7,
            name: "tun0".into(),
            state: LinkState {
                up,
                ..LinkState::default()
            },
            operstate: "DOWN".into(),
            mtu: 1500,
            carrier: false,
            address: None,
            kind: Some("tun".into()),
            tun: Some(TunInfo::default()),
            master: None,
        }
    }

    #[test]
    fn addresses_and_routes_parse_like_ip() {
        assert_eq!(
            parse_addr("10.0.0.1/24").unwrap().to_string(),
            "10.0.0.1/24"
        );
        assert_eq!(parse_addr("10.0.0.1").unwrap().to_string(), "10.0.0.1/32");
        assert_eq!(parse_addr("fd00::1").unwrap().to_string(), "fd00::1/128");
        assert!(parse_addr("10.0.0.1/33").unwrap_err().contains("too long"));
        assert!(parse_addr("tun0").is_err());
        assert_eq!(
            parse_route("default", false).unwrap().to_string(),
            "0.0.0.0/0"
        );
        assert_eq!(parse_route("default", true).unwrap().to_string(), "::/0");
        assert_eq!(
            parse_route("10.1.0.0/16", false).unwrap().to_string(),
            "10.1.0.0/16"
        );
        let e = parse_route("10.1.2.3/16", false).unwrap_err();
        assert!(e.contains("did you mean 10.1.0.0/16"), "{e}");
        assert!(
            parse_ip("10.0.0.300", "--via")
                .unwrap_err()
                .contains("--via")
        );
    }

    #[test]
    fn plan_orders_up_first_and_down_last_with_undos() {
        let req = SetRequest {
            up: Some(true),
            mtu: Some(1400),
            add_addrs: vec![(parse_addr("10.0.0.1/24").unwrap(), None)],
            add_routes: vec![(
                parse_route("10.1.0.0/24", false).unwrap(),
                Some("10.0.0.2".parse().unwrap()),
            )],
            ..SetRequest::default()
        };
        let steps = plan(&req, &tun0(false), &[], &[]).unwrap();
        let names: Vec<String> = steps.iter().map(|(s, _)| s.to_string()).collect();
        assert_eq!(
            names,
            [
                "set mtu 1400",
                "set up",
                "add address 10.0.0.1/24",
                "add route 10.1.0.0/24 via 10.0.0.2"
            ]
        );
        assert_eq!(steps[0].1, Step::Mtu(1500));
        assert_eq!(steps[1].1, Step::Up(false));
        let down = SetRequest {
            up: Some(false),
            add_addrs: req.add_addrs.clone(),
            ..SetRequest::default()
        };
        let steps = plan(&down, &tun0(true), &[], &[]).unwrap();
        assert_eq!(steps.last().unwrap().0, Step::Up(false));
    }

    #[test]
    fn plan_skips_what_is_already_so() {
        let req = SetRequest {
            up: Some(true),
            mtu: Some(1500),
            promisc: Some(false),
            ..SetRequest::default()
        };
        assert!(plan(&req, &tun0(true), &[], &[]).unwrap().is_empty());
    }

    #[test]
    fn plan_refuses_before_changing_anything() {
        let link = tun0(true);
        let existing = Address {
            index: 7,
            local: parse_addr("10.0.0.1/24").unwrap(),
            peer: None,
            scope: "universe".into(),
        };
        let cases = [
            (
                SetRequest {
                    mtu: Some(20),
                    ..Default::default()
                },
                "out of range",
            ),
            (
                SetRequest {
                    add_addrs: vec![(parse_addr("10.0.0.1/16").unwrap(), None)],
                    ..Default::default()
                },
                "already has address 10.0.0.1",
            ),
            (
                SetRequest {
                    add_addrs: vec![
                        (parse_addr("10.3.0.1/24").unwrap(), None),
                        (parse_addr("10.3.0.1/24").unwrap(), None),
                    ],
                    ..Default::default()
                },
                // (It said the device already had it.)
                "--addr 10.3.0.1 is given twice",
            ),
            (
                SetRequest {
                    add_addrs: vec![(
                        parse_addr("10.0.0.9/24").unwrap(),
                        Some("fd00::1".parse().unwrap()),
                    )],
                    ..Default::default()
                },
                "same family",
            ),
            (
                SetRequest {
                    del_addrs: vec![parse_addr("10.9.9.9/24").unwrap()],
                    ..Default::default()
                },
                "has no address 10.9.9.9/24",
            ),
            (
                SetRequest {
                    del_routes: vec![parse_route("10.5.0.0/16", false).unwrap()],
                    ..Default::default()
                },
                "has no route to 10.5.0.0/16",
            ),
            (
                SetRequest {
                    add_routes: vec![(
                        parse_route("fd00::/64", true).unwrap(),
                        Some("10.0.0.2".parse().unwrap()),
                    )],
                    ..Default::default()
                },
                "same family",
            ),
        ];
        // Deleted and added again with another prefix, in one request.
        let again = SetRequest {
            del_addrs: vec![parse_addr("10.0.0.1/24").unwrap()],
            add_addrs: vec![(parse_addr("10.0.0.1/16").unwrap(), None)],
            ..Default::default()
        };
        let steps = plan(&again, &link, std::slice::from_ref(&existing), &[]).unwrap();
        assert_eq!(steps.len(), 2, "delete, then add");
        assert!(
            parse_addr("10.0.0.1/33")
                .unwrap_err()
                .contains("the prefix /33 is too long for an IPv4 address (at most /32)")
        );
        assert!(
            parse_addr("fd00::1/129")
                .unwrap_err()
                .contains("at most /128")
        );
        for (req, want) in cases {
            let err = plan(&req, &link, std::slice::from_ref(&existing), &[]).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains(want) && text.contains("nothing was changed"),
                "{text}"
            );
        }
    }

    #[test]
    fn add_request_differences_name_each_field() {
        let req = AddRequest::new(
            Some("tap0"),
            Mode::Tap,
            Some("0"),
            None,
            (false, true, false),
            false,
            "/dev/net/tun".into(),
        )
        .unwrap();
        let info = TunInfo {
            mode: Some(Mode::Tun),
            persist: true,
            owner: Some(0),
            ..TunInfo::default()
        };
        let diff = req.differences(&info);
        assert_eq!(
            diff,
            ["wanted mode tap, has tun", "wanted vnet_hdr, has not"]
        );
        let same = TunInfo {
            mode: Some(Mode::Tap),
            vnet_hdr: true,
            persist: true,
            owner: Some(0),
            ..TunInfo::default()
        };
        assert!(req.differences(&same).is_empty());
        assert!(matches!(
            AddRequest::new(
                Some("a/b"),
                Mode::Tun,
                None,
                None,
                (false, false, false),
                false,
                "/x".into()
            ),
            Err(DevError::Name(_))
        ));
        let auto = AddRequest::new(
            None,
            Mode::Tap,
            None,
            None,
            (false, false, false),
            false,
            "/x".into(),
        )
        .unwrap();
        assert_eq!(auto.name.as_str(), "tap%d");
    }
}
