//! `tapir qemu-ifup` and `tapir qemu-ifdown`: QEMU's `script=` and
//! `downscript=`, the seed's `/etc/qemu-ifup` done reversibly.
//!
//! ```text
//!   QEMU creates tapN ─▶ script=tapir-qemu-ifup tapN
//!       --bridge BR: BR missing ─▶ created, up, --addr on it, remembered as ours
//!                    tapN up, a port of BR
//!       no bridge:   --addr on tapN itself, tapN up (the seed's form)
//!   QEMU exits ─▶ downscript=tapir-qemu-ifdown tapN
//!       tapN off its bridge; a bridge tapir created goes once its last port is gone
//! ```
//! QEMU passes the tap's name only, so the rest comes from the environment
//! (`TAPIR_QEMU_BRIDGE`, `TAPIR_QEMU_ADDR`) when tapir is run through links
//! named `tapir-qemu-ifup` and `tapir-qemu-ifdown` (or a two-line wrapper
//! script with the flags).

use std::path::{Path, PathBuf};

use ipnet::IpNet;
use tapir_sys::{IfName, Netlink};

use crate::dev::DevError;

/// The bridges tapir created, for `qemu-ifup --bridge` or a tunnel's
/// `Bridge =`: one empty file each in the namespace's run directory. Such a
/// bridge goes once it has no port left, whoever sees that first: the last
/// `qemu-ifdown`, the tunnel that made it going down, or `tapir down` after
/// that tunnel crashed; a tunnel started again after a crash takes its
/// bridge back as its own. A bridge that was there before is never one.
/// A mark holds the bridge's interface index: a namespace's directory is
/// named by the namespace's inode, which the kernel reuses, and a mark of
/// a namespace gone must not make a later namespace's bridge of that name
/// tapir's.
pub(crate) struct BridgeMarks(PathBuf);

impl BridgeMarks {
    /// The marks of this namespace, their directory made if missing.
    pub(crate) fn open(run_dir: &Path) -> Result<Self, DevError> {
        let scope = crate::scope::Scope::current().map_err(DevError::Runtime)?;
        crate::uapi::ensure_private_dir(run_dir).map_err(DevError::Invalid)?;
        let here = scope.dir(run_dir);
        crate::uapi::ensure_private_dir(&here).map_err(DevError::Invalid)?;
        let dir = here.join("bridges");
        crate::uapi::ensure_private_dir(&dir).map_err(DevError::Invalid)?;
        Ok(Self(dir))
    }

    /// The marks of this namespace, if there are any.
    pub(crate) fn existing(run_dir: &Path) -> Option<Self> {
        let scope = crate::scope::Scope::current().ok()?;
        let dir = scope.dir(run_dir).join("bridges");
        dir.is_dir().then_some(Self(dir))
    }

    /// Remembers bridge `name`, interface `index`, as made by tapir.
    pub(crate) fn add(&self, name: &str, index: u32) -> Result<(), DevError> {
        std::fs::write(self.0.join(name), format!("{index}\n"))
            .map_err(|e| DevError::Runtime(format!("remembering bridge {name}: {e}")))
    }

    /// Whether tapir made bridge `name`, interface `index`.
    pub(crate) fn has(&self, name: &str, index: u32) -> bool {
        std::fs::read_to_string(self.0.join(name))
            .is_ok_and(|t| t.trim().parse::<u32>().ok() == Some(index))
    }

    /// Forgets `name` (its directory goes once empty).
    pub(crate) fn forget(&self, name: &str) {
        let _ = std::fs::remove_file(self.0.join(name));
        self.tidy();
    }

    /// Removes the marks' directory if it is empty: the namespace's run
    /// directory, which goes once empty as its tunnels end, kept it (a
    /// tunnel joining a bridge that was there before left both behind).
    pub(crate) fn tidy(&self) {
        let _ = std::fs::remove_dir(&self.0);
    }

    /// Removes the remembered bridges that have no port left (and the
    /// marks of bridges gone); what it removed, in words.
    pub(crate) fn sweep(&self, nl: &mut Netlink) -> Result<Vec<String>, DevError> {
        let mut done = Vec::new();
        let links = nl.links()?;
        for entry in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Gone, or another of that name since: not tapir's.
            let Some(br) = links
                .iter()
                .find(|l| l.name == name && self.has(&name, l.index))
            else {
                let _ = std::fs::remove_file(entry.path());
                continue;
            };
            let ports = links.iter().filter(|l| l.master == Some(br.index)).count();
            if ports == 0 {
                nl.del_link(br.index)?;
                let _ = std::fs::remove_file(entry.path());
                done.push(format!(
                    "removed bridge {name}: tapir created it (for a tunnel's Bridge or a qemu-ifup, this one's or another's), and it has no port left"
                ));
            }
        }
        // (Left empty, the directory goes: a namespace's run directory is
        // removed once empty.)
        self.tidy();
        Ok(done)
    }
}

/// That `link` (named `tap`) is a tun/tap device: QEMU hands these scripts
/// its tap, and a typo (`eth0`, `lo`) must not take a host's link off the
/// network or onto a bridge.
fn a_tap(tap: &IfName, link: &tapir_sys::netlink::Link) -> Result<(), DevError> {
    if link.is_tun() {
        return Ok(());
    }
    Err(DevError::Invalid(format!(
        "{tap} is not a tap device (it is {}): give the tap QEMU created (-netdev tap,ifname=...); nothing was changed",
        link.kind
            .as_deref()
            .unwrap_or("a physical or loopback device")
    )))
}

/// That `addr`'s subnet is not in use here already (two bridges held one
/// address, as with guest-net before it checked).
fn free(nl: &mut Netlink, addr: IpNet) -> Result<(), DevError> {
    let IpNet::V4(v4) = addr.trunc() else {
        return Ok(());
    };
    match crate::guestnet::in_use(nl, v4).map_err(DevError::Runtime)? {
        Some(what) => Err(DevError::Invalid(format!(
            "--addr {addr}: {v4} is in use here ({what}): choose another subnet; nothing was changed"
        ))),
        None => Ok(()),
    }
}

/// What `ifup` did, in words.
pub fn ifup(
    tap: &IfName,
    bridge: Option<&IfName>,
    addr: Option<IpNet>,
    run_dir: &Path,
) -> Result<Vec<String>, DevError> {
    let mut nl = Netlink::open()?;
    let link = nl.link(tap.as_str())?.ok_or_else(|| {
        DevError::NotFound(format!(
            "{tap} (QEMU creates the tap before it runs its script=)"
        ))
    })?;
    a_tap(tap, &link)?;
    let mut done = Vec::new();
    match bridge {
        Some(br) => {
            let mut created = None;
            let index = match nl.link(br.as_str())? {
                Some(l) if l.kind.as_deref() == Some("bridge") => {
                    if let Some(a) = addr {
                        let on = nl.addresses(Some(l.index))?;
                        let has = on.iter().any(|x| x.local == a);
                        let ours = BridgeMarks::existing(run_dir)
                            .is_some_and(|m| m.has(br.as_str(), l.index));
                        // (Not the kernel's own fe80:: of the bridge.)
                        let other = on.iter().find(|x| {
                            x.local.addr().is_ipv4() == a.addr().is_ipv4()
                                && x.scope != "link"
                                && x.scope != "host"
                        });
                        if has {
                        } else if let (true, Some(o)) = (ours, other) {
                            return Err(DevError::Invalid(format!(
                                "{br} has {} already (an earlier qemu-ifup made it): give its VMs that --addr, or none, or another --bridge",
                                o.local
                            )));
                        } else if ours {
                            // Made by an earlier qemu-ifup without --addr:
                            // tapir's, and its addresses go with it.
                            free(&mut nl, a)?;
                            nl.add_address(l.index, a, None)?;
                            done.push(format!("put {a} on {br} (tapir created it)"));
                        } else {
                            done.push(format!(
                                "warning: --addr {a} not put on {br}: it was there before, and tapir changes only a bridge it creates (ip addr add {a} dev {br})"
                            ));
                        }
                    }
                    l.index
                }
                Some(l) => {
                    return Err(DevError::Invalid(format!(
                        "{br} exists and is not a bridge (it is {}): choose another --bridge",
                        l.kind.as_deref().unwrap_or("a plain interface")
                    )));
                }
                None => {
                    if let Some(a) = addr {
                        free(&mut nl, a)?;
                    }
                    let i = nl.add_bridge(br.as_str())?;
                    let made = (|| -> Result<(), DevError> {
                        BridgeMarks::open(run_dir)?.add(br.as_str(), i)?;
                        if let Some(a) = addr {
                            nl.add_address(i, a, None)?;
                        }
                        nl.set_up(i, true)?;
                        Ok(())
                    })();
                    if let Err(e) = made {
                        let _ = nl.del_link(i);
                        return Err(e);
                    }
                    done.push(format!(
                        "created bridge {br}{}",
                        addr.map(|a| format!(" with {a}")).unwrap_or_default()
                    ));
                    created = Some(i);
                    i
                }
            };
            if let Err(e) = nl.set_master(link.index, Some(index)) {
                // A bridge made for this port goes with it.
                if let Some(i) = created {
                    let _ = nl.del_link(i);
                    if let Ok(m) = BridgeMarks::open(run_dir) {
                        m.forget(br.as_str());
                    }
                }
                return Err(DevError::Runtime(format!(
                    "{tap} cannot be a port of {br}: {}{}",
                    e.reason(),
                    if created.is_some() {
                        format!(" ({br}, created for it, is removed)")
                    } else {
                        String::new()
                    }
                )));
            }
            done.push(format!("{tap} is a port of {br}"));
            // A smaller port (a tunnel's tap) drops the guest's full frames.
            if let Some((port, mtu)) = nl
                .links()?
                .into_iter()
                .filter(|l| l.master == Some(index) && l.index != link.index && l.mtu < link.mtu)
                .map(|l| (l.name, l.mtu))
                .min_by_key(|(_, m)| *m)
            {
                done.push(format!(
                    "warning: {br} has a port of MTU {mtu} ({port}): frames over {mtu} bytes from the guest are dropped there; give it MTU {mtu} (-device virtio-net-pci,host_mtu={mtu}, or in the guest)"
                ));
            }
        }
        None => {
            if let Some(a) = addr {
                let has = nl.addresses(Some(link.index))?.iter().any(|x| x.local == a);
                if !has {
                    free(&mut nl, a)?;
                    nl.add_address(link.index, a, None)?;
                    done.push(format!("{a} on {tap}"));
                }
            }
        }
    }
    nl.set_up(link.index, true)?;
    done.push(format!("{tap} is up"));
    Ok(done)
}

/// Takes the tap off its bridge, and removes a bridge tapir created once
/// its last port is gone. A tap already gone is fine (QEMU may close it first).
pub fn ifdown(tap: &IfName, addr: Option<IpNet>, run_dir: &Path) -> Result<Vec<String>, DevError> {
    let mut nl = Netlink::open()?;
    let mut done = Vec::new();
    if let Some(link) = nl.link(tap.as_str())? {
        a_tap(tap, &link)?;
        if link.master.is_some() {
            nl.set_master(link.index, None)?;
            done.push(format!("{tap} is off its bridge"));
        }
        // The address ifup put on the tap itself (a persistent tap keeps
        // what is left on it).
        if let Some(a) = addr.filter(|_| link.master.is_none()) {
            let has = nl.addresses(Some(link.index))?.iter().any(|x| x.local == a);
            if has {
                nl.del_address(link.index, a, None)?;
                done.push(format!("{a} off {tap}"));
            }
        }
        nl.set_up(link.index, false)?;
    }
    // Bridges of ours with no port left, this one's or one whose last
    // port vanished with its QEMU.
    if let Some(m) = BridgeMarks::existing(run_dir) {
        done.extend(m.sweep(&mut nl)?);
    }
    Ok(done)
}
