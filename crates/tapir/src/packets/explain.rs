//! `tapir explain ADDR|DEV`: the kernel's view in words, for the questions
//! people ask while learning TUN/TAP ("ping to my tun's address works
//! without my program: why?", "tcpdump on tun0 shows nothing", "which
//! process holds tap0?"). Every answer comes from the kernel's own state
//! (a route lookup, the link, its holders), and `--json` carries those facts.

use std::net::IpAddr;

use serde::Serialize;
use tapir_sys::{IfName, Netlink};

use crate::dev::{self, DevError, DeviceView};

/// What `explain` found and concluded.
#[derive(Debug, Serialize)]
pub struct Explanation {
    /// What was asked about.
    pub subject: String,
    /// The facts, in the kernel's words (`route.kind`, `device.carrier`...).
    pub facts: serde_json::Value,
    /// What they mean, most important first.
    pub findings: Vec<String>,
    /// What to do or check next.
    pub next: Vec<String>,
}

/// The tun/tap device `name`, if it is one.
fn tun_view(name: &str) -> Option<DeviceView> {
    dev::show(name).ok()
}

/// A tunnel's peer that covers an address: its public key (base64), the
/// allowed IP that covers it, its latest handshake (Unix time, 0: never).
type Covering = (String, String, u64);

/// The tapir tunnel answering for interface `name`: which of its peers
/// covers `addr`, if any, and how many peers it has.
fn tunnel_peer(name: &str, addr: IpAddr) -> Option<(Option<Covering>, usize)> {
    let kv = crate::service::query(name).ok()?;
    let mut peers = 0;
    let mut best: Option<(String, ipnet::IpNet, u64)> = None;
    let mut current: Option<(String, u64)> = None;
    for (k, v) in &kv {
        match k.as_str() {
            "public_key" => {
                peers += 1;
                current = Some((v.clone(), 0));
            }
            "last_handshake_time_sec" => {
                if let Some(c) = current.as_mut() {
                    c.1 = v.parse().unwrap_or(0);
                }
            }
            "allowed_ip" => {
                if let (Some(c), Ok(net)) = (&current, v.parse::<ipnet::IpNet>()) {
                    if net.contains(&addr)
                        && best
                            .as_ref()
                            .is_none_or(|b| net.prefix_len() > b.1.prefix_len())
                    {
                        best = Some((c.0.clone(), net, c.1));
                    }
                }
            }
            _ => {}
        }
    }
    // The handshake time follows the allowed IPs in the answer: look it up again.
    let best = best.map(|(key, net, _)| {
        let mut hs = 0;
        let mut inside = false;
        for (k, v) in &kv {
            if k == "public_key" {
                inside = *v == key;
            }
            if inside && k == "last_handshake_time_sec" {
                hs = v.parse().unwrap_or(0);
            }
        }
        let b64 = tapir_proto::wg::keys::decode_hex32(&key)
            .map(|k| tapir_proto::wg::keys::PublicKey(k).to_base64())
            .unwrap_or(key);
        (b64, net.to_string(), hs)
    });
    Some((best, peers))
}

/// `tapir explain ADDR`.
pub fn address(addr: IpAddr) -> Result<Explanation, DevError> {
    let mut nl = Netlink::open()?;
    let lookup = nl.route_to(addr)?;
    let mut findings = Vec::new();
    let mut next = Vec::new();
    let Some(route) = lookup else {
        findings.push(format!("the kernel has no route to {addr}: packets to it are not sent anywhere (\"Network is unreachable\")"));
        next.push(format!(
            "add one: tapir dev set DEV --route {addr}/{} (or a subnet holding it)",
            if addr.is_ipv4() { 32 } else { 128 }
        ));
        return Ok(Explanation {
            subject: addr.to_string(),
            facts: serde_json::json!({ "route": null }),
            findings,
            next,
        });
    };
    let links = nl.links()?;
    let dev = route
        .oif
        .and_then(|i| links.iter().find(|l| l.index == i))
        .map(|l| l.name.clone());
    let mut facts = serde_json::json!({
        "route": {
            "kind": route.kind,
            "device": dev,
            "gateway": route.gateway,
            "source": route.source,
            "table": route.table,
        }
    });
    // A local address's route goes through lo: name the device that has it.
    let dev = if route.kind == "local" {
        nl.addresses(None)?
            .iter()
            .find(|a| a.local.addr() == addr)
            .and_then(|a| links.iter().find(|l| l.index == a.index))
            .map(|l| l.name.clone())
            .or(dev)
    } else {
        dev
    };
    match route.kind.as_str() {
        "local" => {
            findings.push(format!(
                "{addr} is an address of this host{}: the kernel answers it itself, through lo; nothing reaches a tun/tap device, so your program reads nothing (and a ping works without it)",
                dev.as_deref().filter(|d| *d != "lo").map(|d| format!(" (on {d})")).unwrap_or_default()
            ));
            next.push(format!(
                "to see packets in your program, send to another address routed into the device (with 10.0.0.1/24 on tun0: ping 10.0.0.2); tapir explain {} shows its routes",
                dev.as_deref().unwrap_or("DEV")
            ));
        }
        "unicast" => {
            let via = route
                .gateway
                .map(|g| format!(" via {g}"))
                .unwrap_or_default();
            let name = dev.clone().unwrap_or_else(|| "?".into());
            findings.push(format!(
                "{addr} is routed out of {name}{via} (table {}{}), with source {}",
                route.table,
                if route.table == 254 { ", main" } else { "" },
                route.source.map_or("-".to_string(), |s| s.to_string())
            ));
            if let Some(v) = tun_view(&name) {
                facts["device"] = serde_json::to_value(&v).unwrap_or_default();
                let held: Vec<String> = v
                    .holders
                    .iter()
                    .map(|h| format!("{} (pid {})", h.command, h.pid))
                    .collect();
                if !v.up {
                    findings.push(format!("{name} is a {} device and it is down: the kernel drops what it routes there", v.mode));
                    next.push(format!("tapir dev set {name} --up"));
                } else if !v.open {
                    findings.push(format!(
                        "{name} is a {} device that no process holds: its carrier is down, so what is routed there is dropped, and tcpdump on it shows nothing",
                        v.mode
                    ));
                    next.push(format!("start the program that reads {name} (tapir echo {name}, tapir dump {name}, or your own)"));
                } else {
                    findings.push(format!(
                        "{name} is a {} device held by {}: packets to {addr} go to that program",
                        v.mode,
                        if held.is_empty() {
                            "a process".to_string()
                        } else {
                            held.join(", ")
                        }
                    ));
                }
            }
            if tun_view(&name).is_none() && addr.is_ipv4() {
                guests_hint(
                    &mut nl,
                    &links,
                    &name,
                    addr,
                    &mut findings,
                    &mut next,
                    &mut facts,
                )?;
            }
            if let Some((peer, peers)) = tunnel_peer(&name, addr) {
                facts["tunnel"] = serde_json::json!({ "peers": peers, "peer": peer.as_ref().map(|p| &p.0), "allowed_ip": peer.as_ref().map(|p| &p.1), "latest_handshake": peer.as_ref().map(|p| p.2) });
                match peer {
                    Some((key, net, 0)) => {
                        findings.push(format!("{name} is a tapir tunnel; peer {key} covers {addr} (allowed IP {net}) but has never completed a handshake"));
                        next.push(format!("check that peer's Endpoint and that UDP reaches it (tapir status {name})"));
                    }
                    Some((key, net, hs)) => {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs());
                        findings.push(format!(
                            "{name} is a tapir tunnel; peer {key} covers {addr} (allowed IP {net}), latest handshake {}",
                            crate::service::ago(hs, now)
                        ));
                    }
                    None => {
                        findings.push(format!("{name} is a tapir tunnel, but none of its {peers} peer(s) has {addr} in its allowed IPs: the tunnel drops it"));
                        next.push(format!(
                            "add it to a peer's AllowedIPs (wg set {name} peer KEY allowed-ips ...)"
                        ));
                    }
                }
            }
        }
        other => {
            findings.push(format!(
                "{addr} is routed as {other}: the kernel refuses packets to it"
            ));
            next.push("ip route get shows the same; remove or change that route".into());
        }
    }
    Ok(Explanation {
        subject: addr.to_string(),
        facts,
        findings,
        next,
    })
}

/// "Why does my VM not reach the internet?": for an address routed out of
/// `out` (not a tun/tap), the guest subnets of this host (addresses on
/// bridges and taps) that cannot reach it, and why: forwarding off, or no
/// masquerade for them out of `out`.
fn guests_hint(
    nl: &mut Netlink,
    links: &[tapir_sys::Link],
    out: &str,
    addr: IpAddr,
    findings: &mut Vec<String>,
    next: &mut Vec<String>,
    facts: &mut serde_json::Value,
) -> Result<(), DevError> {
    let guest_links: Vec<&tapir_sys::Link> = links
        .iter()
        .filter(|l| l.kind.as_deref() == Some("bridge") || l.is_tun())
        .filter(|l| l.name != out)
        .collect();
    let addrs = nl.addresses(None)?;
    let subnets: Vec<(String, ipnet::IpNet)> = addrs
        .iter()
        .filter(|a| a.local.addr().is_ipv4())
        .filter_map(|a| {
            guest_links
                .iter()
                .find(|l| l.index == a.index)
                .map(|l| (l.name.clone(), a.local.trunc()))
        })
        .collect();
    if subnets.is_empty() {
        return Ok(());
    }
    let forwarding =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "1");
    let nat = crate::nat::entries().unwrap_or_default();
    facts["guests"] = serde_json::json!({
        "forwarding": forwarding,
        "subnets": subnets.iter().map(|(l, n)| format!("{n} on {l}")).collect::<Vec<_>>(),
        "masquerade": nat.iter().map(|e| format!("{} out of {}", e.source, e.out)).collect::<Vec<_>>(),
    });
    for (link, net) in &subnets {
        if !forwarding {
            findings.push(format!(
                "forwarding is off on this host: guests on {link} ({net}) reach the host only, not {addr}"
            ));
            next.push(format!("tapir nat enable --source {net} --out {out} (forwarding and masquerade, reversibly)"));
        } else if !nat.iter().any(|e| e.source == *net && e.out == out) {
            findings.push(format!(
                "no masquerade for {net} (on {link}) out of {out}: guests' packets leave with their own addresses, and replies find no way back unless the next hop routes {net} to this host"
            ));
            next.push(format!("tapir nat enable --source {net} --out {out}"));
        }
    }
    Ok(())
}

/// `tapir explain DEV`.
pub fn device(name: &IfName) -> Result<Explanation, DevError> {
    let v = dev::show(name.as_str())?;
    let counters = |what: &str| {
        std::fs::read_to_string(format!("/sys/class/net/{name}/statistics/{what}"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (rx, tx, tx_dropped) = (
        counters("rx_packets"),
        counters("tx_packets"),
        counters("tx_dropped"),
    );
    let mut facts = serde_json::to_value(&v).unwrap_or_default();
    facts["counters"] =
        serde_json::json!({ "rx_packets": rx, "tx_packets": tx, "tx_dropped": tx_dropped });
    let mut findings = vec![format!(
        "{name} is a {}{} device{}{}",
        if v.persist { "persistent " } else { "" },
        v.mode,
        v.owner
            .as_ref()
            .map(|o| format!(" owned by user {o}"))
            .unwrap_or_default(),
        if v.mode == "tun" {
            ": IP packets, no Ethernet header (tcpdump -i on it shows raw IP)"
        } else {
            ": Ethernet frames, with its own MAC"
        }
    )];
    let mut next = Vec::new();
    if !v.up {
        findings.push("it is down: no address on it is used and nothing is routed there".into());
        next.push(format!("tapir dev set {name} --up"));
    }
    if v.open {
        let held: Vec<String> = v
            .holders
            .iter()
            .map(|h| format!("{} (pid {})", h.command, h.pid))
            .collect();
        findings.push(format!(
            "held by {}: what the kernel routes to it is read by that program (the carrier is up)",
            if held.is_empty() {
                "a process of another namespace".to_string()
            } else {
                held.join(", ")
            }
        ));
    } else {
        findings.push("no process holds it: its carrier is down, what is routed there is dropped (tx_dropped counts it), and tcpdump on it shows nothing".into());
        next.push(format!(
            "attach a program (tapir echo {name}, tapir dump {name}, or your own)"
        ));
    }
    if v.addresses.is_empty() {
        findings.push(
            "it has no address: the host sends nothing through it unless a route points there"
                .into(),
        );
    }
    for a in &v.addresses {
        findings.push(format!(
            "{}/{} is the host's own address here: pinging it is answered by the kernel through lo, never through {name}; the other addresses of the subnet are routed into {name}",
            a.local, a.prefixlen
        ));
    }
    if v.routes.is_empty() && !v.addresses.is_empty() {
        findings.push("no route through it but its addresses' own subnets".into());
    }
    if tx_dropped > 0 && !v.open {
        findings.push(format!(
            "{tx_dropped} packet(s) were dropped for want of a reader"
        ));
    }
    if v.pi && v.open {
        findings.push("packet information is on: each read starts with 4 more bytes (flags and protocol) before the packet".into());
    }
    if v.vnet_hdr {
        findings.push("the vnet header is on: each read starts with a 10- or 12-byte virtio-net header (offloads)".into());
    }
    if crate::service::query(name.as_str()).is_ok()
        && v.mtu > crate::config::DEFAULT_MTU
        && v.mode == "tun"
    {
        findings.push(format!(
            "its MTU {} is larger than a WireGuard tunnel over a 1500-byte path carries ({}): large packets will be lost",
            v.mtu,
            crate::config::DEFAULT_MTU
        ));
    }
    Ok(Explanation {
        subject: name.to_string(),
        facts,
        findings,
        next,
    })
}

/// The explanation in words.
pub fn format(e: &Explanation) -> String {
    let mut out = format!("{}:\n", e.subject);
    for f in &e.findings {
        out += &format!("  - {f}\n");
    }
    for n in &e.next {
        out += &format!("  next: {n}\n");
    }
    out
}
