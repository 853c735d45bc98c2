//! `tapir echo`: a device that answers pings, the classic icmpecho program.
//!
//! ```text
//!   EchoRequest (validated) ─▶ attach/create device ─▶ add addresses, up (each recorded)
//!        loop: wait ─▶ read ─▶ [pcap] ─▶ Responder::handle ─▶ write ─▶ [pcap]
//!        on shutdown: counters; take back what we added; a device we created goes with its fd
//! ```

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use tapir_proto::echo::{Config, Link, Responder, Stats};
use tapir_sys::{IfName, Mode, Netlink};

use crate::capture::{self, Reader};
use crate::dev::DevError;

/// What `tapir echo` was asked for, checked.
#[derive(Debug, Clone)]
pub struct EchoRequest {
    /// The device.
    pub name: IfName,
    /// Mode for a device we create; must match an existing one.
    pub mode: Option<Mode>,
    /// Host addresses to configure (`--addr`).
    pub addrs: Vec<IpNet>,
    /// Answer only for these (`--only`).
    pub only: Vec<IpAddr>,
    /// Record requests and replies here.
    pub pcap: Option<PathBuf>,
    /// Our MAC in tap mode.
    pub mac: [u8; 6],
    /// Whether `mac` was asked for (`--mac`), not made up.
    pub mac_given: bool,
    /// The clone device.
    pub tun_path: PathBuf,
}

/// What an echo run did.
#[derive(Debug, Clone)]
pub struct EchoReport {
    /// The device (a template's, as the kernel named it).
    pub name: String,
    /// Counters.
    pub stats: Stats,
    /// Packets that could not be written back.
    pub write_errors: u64,
}

/// Formats the counters as `tapir echo` prints them on exit.
pub fn format_stats(r: &EchoReport) -> String {
    let (name, s) = (&r.name, r.stats);
    format!(
        "{name}: {} received, {} echo replies, {} ARP replies, {} neighbour advertisements; \
         ignored: {} not for us, {} fragments, {} not echo, {} malformed, {} bad checksum; {} write errors\n",
        s.received,
        s.echo_replies,
        s.arp_replies,
        s.nd_replies,
        s.not_for_us,
        s.fragments,
        s.not_echo,
        s.malformed,
        s.bad_checksum,
        r.write_errors
    )
}

/// A locally administered, unicast MAC from 6 random bytes.
pub fn local_mac(mut random: [u8; 6]) -> [u8; 6] {
    random[0] = (random[0] & 0xfc) | 0x02;
    random
}

/// What we changed on a device that existed before, to take back on exit.
struct Changes {
    index: u32,
    added: Vec<IpNet>,
    brought_up: bool,
    before_addrs: Vec<tapir_sys::Address>,
    before_routes: Vec<tapir_sys::Route>,
}

fn configure(
    nl: &mut Netlink,
    name: &IfName,
    addrs: &[IpNet],
) -> Result<(Changes, Vec<IpNet>), DevError> {
    let link = nl
        .link(name.as_str())?
        .ok_or_else(|| DevError::NotFound(name.to_string()))?;
    let existing = nl.addresses(Some(link.index))?;
    let mut changes = Changes {
        index: link.index,
        added: Vec::new(),
        brought_up: false,
        before_addrs: existing.clone(),
        before_routes: nl.routes(Some(link.index))?,
    };
    let result = (|| {
        for a in addrs {
            match existing.iter().find(|e| e.local.addr() == a.addr()) {
                None => {
                    nl.add_address(link.index, *a, None)?;
                    changes.added.push(*a);
                }
                // The same address, otherwise: the kernel holds one per
                // address, so the other subnet (or peer) stays, said.
                Some(e) if e.local.prefix_len() != a.prefix_len() || e.peer.is_some() => {
                    eprintln!(
                        "tapir echo: warning: --addr {a} not added: {name} has {}{} already, which routes another subnet (tapir dev show {name}; ip addr del it for this one)",
                        e.local,
                        e.peer.map(|p| format!(" peer {p}")).unwrap_or_default()
                    );
                }
                Some(_) => {}
            }
        }
        if !link.state.up {
            nl.set_up(link.index, true)?;
            changes.brought_up = true;
        }
        Ok::<(), tapir_sys::NetlinkError>(())
    })();
    if let Err(e) = result {
        undo(nl, &changes);
        return Err(e.into());
    }
    let subnets = nl
        .addresses(Some(link.index))?
        .into_iter()
        .map(|a| a.local)
        .collect();
    Ok((changes, subnets))
}

fn undo(nl: &mut Netlink, changes: &Changes) {
    for a in changes.added.iter().rev() {
        let _ = nl.del_address(changes.index, *a, None);
    }
    if changes.brought_up {
        let _ = nl.set_up(changes.index, false);
    }
    // Going down drops IPv6 addresses the device had before: put them back.
    for problem in crate::dev::restore(
        nl,
        changes.index,
        &changes.before_addrs,
        &changes.before_routes,
    ) {
        eprintln!("warning: could not put back {problem}");
    }
}

fn now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Runs the responder until `shutdown` is set; then takes back what it set
/// up and returns the counters.
pub fn run(req: &EchoRequest, shutdown: &AtomicBool) -> Result<EchoReport, DevError> {
    // Without CAP_NET_ADMIN, a device of one's own that is up with its
    // addresses is answered on all the same (attaching is the owner's
    // right); only a change to it needs the capability, said then.
    let Reader {
        dev,
        mode,
        framing,
        created,
    } = capture::attach(&req.tun_path, &req.name, req.mode)?;
    // (Taken and ignored before.)
    // (A device made for this run goes with its descriptor.)
    if mode == Mode::Tun && req.mac_given {
        return Err(DevError::Invalid(format!(
            "--mac is for tap mode: {} is a tun device, which carries IP packets, not Ethernet frames, and has no MAC",
            req.name
        )));
    }
    let mut pcap = req
        .pcap
        .as_deref()
        .map(|path| capture::pcap_writer(path, mode, 0))
        .transpose()?;
    let name = dev.name().clone();
    let mut nl = Netlink::open()?;
    let (changes, subnets) = configure(&mut nl, &name, &req.addrs).map_err(|e| {
        if crate::caps::has_net_admin() {
            e
        } else {
            DevError::Permission(crate::caps::net_admin_missing(
                "configuring a device for tapir echo (its addresses, up)",
            ))
        }
    })?;
    let link = match mode {
        Mode::Tun => Link::Ip,
        Mode::Tap => Link::Ethernet,
    };
    let mut responder = Responder::new(Config {
        link,
        mac: req.mac,
        subnets,
        only: req.only.clone(),
    });
    // An --only address that can never be answered is refused, not
    // silently never answered.
    if let Some((a, why)) = req
        .only
        .iter()
        .find_map(|a| Some((a, responder.never_served(*a)?)))
    {
        if !created {
            undo(&mut nl, &changes);
        }
        return Err(DevError::Invalid(format!(
            "--only {a}: {why}, so it would never be answered: give an address of the device's subnets, not its own"
        )));
    }
    // On a tun, what a route sends to it: one no route sends there is not
    // answered until one does (said, where it was silently never answered).
    if link == Link::Ip {
        for a in &req.only {
            let to = nl.route_to(*a).ok().flatten().and_then(|r| r.oif);
            if to != Some(changes.index) {
                eprintln!(
                    "warning: --only {a}: no route sends it to {name} yet, so pings to it do not come here: add one (tapir dev set {name} --route {a}/{})",
                    if a.is_ipv4() { 32 } else { 128 }
                );
            }
        }
    }
    eprintln!(
        "{name}: answering pings ({mode}{}); Ctrl-C to stop",
        if link == Link::Ethernet {
            format!(", MAC {}", tapir_wire::summary::mac(&req.mac))
        } else {
            String::new()
        }
    );
    let mut buf = vec![0u8; 65536 + framing.prefix_len()];
    let prefix = framing.prefix_len();
    let mut write_errors = 0;
    let mut failure = None;
    let mut looked = std::time::Instant::now();
    while !shutdown.load(Ordering::Relaxed) {
        // The host's addresses, again each second: one it takes while echo
        // runs is its own from then on, not served (its DAD failed).
        if looked.elapsed() >= Duration::from_secs(1) {
            looked = std::time::Instant::now();
            if let Ok(a) = nl.addresses(Some(changes.index)) {
                responder.set_subnets(a.into_iter().map(|a| a.local).collect());
            }
        }
        let n = match capture::next_packet(&dev, &mut buf) {
            Ok(Some(n)) => n,
            Ok(None) => continue,
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        if n < prefix {
            continue;
        }
        if let Some(w) = pcap.as_mut() {
            record(w, &buf[prefix..n])?;
        }
        let (head, packet) = buf.split_at_mut(prefix);
        if let tapir_proto::echo::Outcome::Reply(len) = responder.handle(packet, n - prefix) {
            framing.reset_for_write(head);
            if dev.write(&buf[..prefix + len]).is_err() {
                write_errors += 1;
            }
            if let Some(w) = pcap.as_mut() {
                record(w, &buf[prefix..prefix + len])?;
            }
        }
    }
    if let Some(mut w) = pcap {
        let _ = w.flush();
    }
    if !created {
        undo(&mut nl, &changes);
    }
    drop(dev);
    if let Some(e) = failure {
        return Err(DevError::Runtime(format!(
            "{name}: reading the device failed: {e}"
        )));
    }
    Ok(EchoReport {
        name: name.to_string(),
        stats: responder.stats(),
        write_errors,
    })
}

/// Writes a packet to the capture and flushes it, as dump does (tcpdump's
/// `-U`): the file is whole while echo runs, and after it is killed.
fn record<W: std::io::Write>(
    w: &mut tapir_wire::pcap::PcapWriter<W>,
    packet: &[u8],
) -> Result<(), DevError> {
    w.write_packet(now(), packet)
        .and_then(|()| w.flush())
        .map_err(|e| DevError::Runtime(format!("writing the pcap file: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_local_unicast() {
        for r in [[0xff; 6], [0; 6], [0x01, 2, 3, 4, 5, 6]] {
            let m = local_mac(r);
            assert_eq!(m[0] & 0x01, 0, "unicast");
            assert_eq!(m[0] & 0x02, 0x02, "locally administered");
            assert_eq!(&m[1..], &r[1..]);
        }
    }
}
