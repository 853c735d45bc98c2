//! Devices at boot: `[[device]]` tables of tapir's TOML, the seed's init
//! script that recreated a persistent tap at every boot, declared once.
//!
//! ```text
//!   tapir up FILE   ─▶ each device: missing ─▶ created (persistent, owner, group, flags)
//!                                   there  ─▶ flags differ ─▶ refused, the difference named
//!                                          ─▶ owner, group, MTU, addresses, routes, up differ ─▶ corrected
//!                                          ─▶ as declared ─▶ "unchanged"
//!                   no process is left: the devices are persistent
//!   tapir down FILE ─▶ each device deleted
//! ```
//! The steps that change addresses, routes, MTU and state go through
//! `dev set`, which is all or nothing.

use std::path::Path;

use ipnet::IpNet;
use tapir_sys::{IfName, Mode, Netlink, TunDevice};

use crate::dev::{self, AddRequest, Added, DevError, SetRequest};

/// One `[[device]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Its name (no template).
    pub name: IfName,
    /// tun or tap.
    pub mode: Mode,
    /// User allowed to open it (name or uid).
    pub user: Option<String>,
    /// Group allowed to open it (name or gid).
    pub group: Option<String>,
    /// `IFF_MULTI_QUEUE`.
    pub multi_queue: bool,
    /// `IFF_VNET_HDR`.
    pub vnet_hdr: bool,
    /// Packet information header (`IFF_NO_PI` off).
    pub pi: bool,
    /// MTU (the kernel's default if absent).
    pub mtu: Option<u32>,
    /// Its addresses (exactly these, link-local ones aside).
    pub addresses: Vec<IpNet>,
    /// Routes through it.
    pub routes: Vec<IpNet>,
    /// Administratively up.
    pub up: bool,
}

/// What `apply` did to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It was missing: created, then configured.
    Created,
    /// As declared already.
    Unchanged,
    /// It was there and differed: what was corrected.
    Corrected(Vec<String>),
}

/// Makes device `d` as declared (see the module's words); says also what
/// differs and cannot be corrected (an owner the file does not declare:
/// the kernel cannot take one away).
pub fn apply(d: &DeviceConfig, tun_path: &Path) -> Result<(Outcome, Vec<String>), DevError> {
    let req = AddRequest::new(
        Some(d.name.as_str()),
        d.mode,
        d.user.as_deref(),
        d.group.as_deref(),
        (d.pi, d.vnet_hdr, d.multi_queue),
        true,
        tun_path.to_owned(),
    )?;
    let mut fixed = Vec::new();
    let mut kept = Vec::new();
    let created = match dev::add(&req) {
        Ok(Added::Created(_)) => true,
        Ok(Added::Existed(_)) => false,
        Err(DevError::Conflict { name, diff }) => {
            // Owner and group can be set again; the flags only by recreating
            // the device, which would cut off whoever uses it: refused.
            let only_ownership = diff
                .split("; ")
                .all(|p| p.starts_with("wanted user") || p.starts_with("wanted group"));
            if !only_ownership {
                return Err(DevError::Conflict { name, diff });
            }
            let dev = TunDevice::open(tun_path, &d.name, req.options).map_err(|e| {
                DevError::Conflict {
                    name: name.clone(),
                    diff: format!("{diff}, and it cannot be corrected: {e}"),
                }
            })?;
            let info = Netlink::open()?
                .link(d.name.as_str())?
                .and_then(|l| l.tun)
                .ok_or_else(|| DevError::NotFound(d.name.to_string()))?;
            let id = |v: Option<u32>| v.map_or("none".to_string(), |n| n.to_string());
            for (what, want, has) in [
                ("user", req.owner, info.owner),
                ("group", req.group, info.group),
            ] {
                match want {
                    _ if want == has => {}
                    Some(v) => {
                        if what == "user" {
                            dev.set_owner(v)?;
                        } else {
                            dev.set_group(v)?;
                        }
                        fixed.push(format!("{what} {} to {v}", id(has)));
                    }
                    None => kept.push(format!(
                        "{what} {} kept, though the file declares none: the kernel cannot take it away (tapir dev del {1}, then up again, to have none)",
                        id(has),
                        d.name
                    )),
                }
            }
            false
        }
        Err(e) => return Err(e),
    };
    // A device created here and not configured as declared goes again:
    // a failed up leaves nothing it created.
    match configure(d, &mut fixed) {
        Ok(()) => {}
        Err(e) => {
            if created {
                let _ = dev::del(d.name.as_str(), true);
            }
            return Err(e);
        }
    }
    let outcome = if created {
        Outcome::Created
    } else if fixed.is_empty() {
        Outcome::Unchanged
    } else {
        Outcome::Corrected(fixed)
    };
    Ok((outcome, kept))
}

/// Gives device `d` (there, with its flags) the MTU, addresses, routes and
/// state declared, all or nothing (see `dev set`); says what it changed in
/// `fixed`. A change can take more with it (a primary address its
/// secondaries, going down the IPv6 addresses): looked at again once, and
/// what it took put back.
fn configure(d: &DeviceConfig, fixed: &mut Vec<String>) -> Result<(), DevError> {
    if pass(d, fixed)? {
        pass(d, fixed)?;
    }
    Ok(())
}

/// One look and one `dev set`; whether it changed anything.
fn pass(d: &DeviceConfig, fixed: &mut Vec<String>) -> Result<bool, DevError> {
    let mut nl = Netlink::open()?;
    let link = nl
        .link(d.name.as_str())?
        .ok_or_else(|| DevError::NotFound(d.name.to_string()))?;
    let addrs = nl.addresses(Some(link.index))?;
    let routes = nl.routes(Some(link.index))?;
    let mut set = SetRequest::default();
    if let Some(m) = d.mtu.filter(|m| *m != link.mtu) {
        set.mtu = Some(m);
        fixed.push(format!("mtu {} to {m}", link.mtu));
    }
    for a in &d.addresses {
        if !addrs.iter().any(|x| x.local == *a) {
            set.add_addrs.push((*a, None));
            fixed.push(format!("address {a} added"));
        }
    }
    for x in &addrs {
        let link_local = match x.local.addr() {
            std::net::IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
            std::net::IpAddr::V4(v4) => v4.is_link_local(),
        };
        if !link_local && !d.addresses.contains(&x.local) {
            set.del_addrs.push(x.local);
            fixed.push(format!("address {} removed", x.local));
        }
    }
    // The addresses' own prefix routes are the kernel's.
    for r in &d.routes {
        let r = r.trunc();
        let covered = d.addresses.iter().any(|a| a.trunc() == r);
        if !covered && !routes.iter().any(|x| x.dst == r) {
            set.add_routes.push((r, None));
            fixed.push(format!("route {r} added"));
        }
    }
    for x in routes.iter().filter(|x| x.protocol != "kernel") {
        if !d.routes.iter().any(|r| r.trunc() == x.dst) && x.dst.prefix_len() > 0 {
            set.del_routes.push(x.dst);
            fixed.push(format!("route {} removed", x.dst));
        }
    }
    if link.state.up != d.up {
        set.up = Some(d.up);
        fixed.push(if d.up { "set up" } else { "set down" }.into());
    }
    if set.is_empty() {
        return Ok(false);
    }
    dev::set(d.name.as_str(), &set)?;
    Ok(true)
}

/// `tapir down FILE` for a device: deleted (`false` if it was not there).
pub fn remove(d: &DeviceConfig) -> Result<bool, DevError> {
    match dev::del(d.name.as_str(), true) {
        Ok(_) => Ok(true),
        Err(DevError::NotFound(_)) => Ok(false),
        Err(e) => Err(e),
    }
}
