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

/// `tapir explain WHAT`: an address (`10.0.0.1`, `fe80::1%eth0`) or a
/// device name.
pub fn explain(what: &str) -> Result<Explanation, DevError> {
    if let Ok(addr) = what.parse::<IpAddr>() {
        return address(addr, None);
    }
    if let Some((a, zone)) = what.split_once('%') {
        if let Ok(addr) = a.parse::<std::net::Ipv6Addr>() {
            let mut nl = Netlink::open()?;
            let links = nl.links()?;
            let link = links
                .iter()
                .find(|l| l.name == zone || zone.parse() == Ok(l.index))
                .ok_or_else(|| {
                    DevError::Runtime(format!(
                        "no link named {zone} here: the zone after % names the link the address is on (ip link lists them)"
                    ))
                })?;
            return address(IpAddr::V6(addr), Some((link.index, link.name.clone())));
        }
    }
    if let Ok(net) = what.parse::<ipnet::IpNet>() {
        return Err(DevError::Runtime(format!(
            "{what} is a subnet: tapir explain takes one address ({}, say) or a device",
            net.addr()
        )));
    }
    if let Ok(sa) = what.parse::<std::net::SocketAddr>() {
        return Err(DevError::Runtime(format!(
            "{what} has a port: tapir explain takes the address alone ({})",
            sa.ip()
        )));
    }
    if what.contains(':')
        || (what.contains('.') && what.chars().all(|c| c.is_ascii_digit() || c == '.'))
    {
        return Err(DevError::Runtime(format!(
            "{what} is neither an IP address nor a device name"
        )));
    }
    device(&IfName::new(what)?)
}

/// `word` as a shell reads it: quoted when it holds anything but the
/// characters names and addresses are made of (an interface name may hold
/// `;` or `$`).
fn sh(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// The refusing policy rule that applies to `addr`, if one does (the first
/// by priority), and whether it applies to every packet to it.
fn refusing_rule(nl: &mut Netlink, addr: IpAddr, action: &str) -> Option<tapir_sys::RefusingRule> {
    let mut rules: Vec<_> = nl
        .refusing_rules()
        .ok()?
        .into_iter()
        .filter(|r| r.v6 == addr.is_ipv6() && r.action == action)
        .filter(|r| r.to.is_none_or(|n| n.contains(&addr)))
        .collect();
    rules.sort_by_key(|r| r.priority.unwrap_or(0));
    rules.into_iter().next()
}

/// `tapir explain ADDR` (`zone`: the link a link-local address is on).
pub fn address(addr: IpAddr, zone: Option<(u32, String)>) -> Result<Explanation, DevError> {
    if let IpAddr::V6(v6) = addr {
        if let Some(v4) = v6.to_ipv4_mapped() {
            let mut e = address(IpAddr::V4(v4), None)?;
            e.subject = addr.to_string();
            e.findings.insert(
                0,
                format!("{addr} is the IPv4 address {v4} written as IPv6: a dual-stack socket reaches it over IPv4, as below"),
            );
            return Ok(e);
        }
    }
    let mut nl = Netlink::open()?;
    let link_local = matches!(addr, IpAddr::V6(a) if a.is_unicast_link_local());
    // The host's addresses, read once for every question below.
    let addrs = nl.addresses(None)?;
    let own = addrs.iter().any(|a| a.local.addr() == addr);
    if link_local && zone.is_none() && !own {
        // Every link has fe80::/64: without a zone the kernel takes the
        // first that fits, and a program must say which.
        let links = nl.links()?;
        let on: Vec<String> = nl
            .routes_out_of(None)?
            .iter()
            .filter(|r| r.dst.contains(&addr))
            .filter_map(|r| r.oif.and_then(|i| links.iter().find(|l| l.index == i)))
            .map(|l| l.name.clone())
            .collect();
        return Ok(Explanation {
            subject: addr.to_string(),
            facts: serde_json::json!({ "route": null, "link_local": true, "links": on }),
            findings: vec![format!(
                "{addr} is a link-local address: every link has its own fe80::/64, so it means nothing without the link it is on{}",
                if on.is_empty() {
                    String::new()
                } else {
                    format!(" (here: {})", on.join(", "))
                }
            )],
            next: vec![format!(
                "name the link: ping {addr}%{} and tapir explain {addr}%{}",
                on.first().map_or("DEV", String::as_str),
                on.first().map_or("DEV", String::as_str)
            )],
        });
    }
    let lookup = match &zone {
        Some((index, _)) => nl.route_out_of(addr, *index)?,
        None => nl.route_to(addr)?,
    };
    let subject = match &zone {
        Some((_, name)) => format!("{addr}%{name}"),
        None => addr.to_string(),
    };
    let mut findings = Vec::new();
    let mut next = Vec::new();
    let Some(route) = lookup else {
        let links = nl.links()?;
        let lo_down = links
            .iter()
            .find(|l| l.name == "lo")
            .is_some_and(|l| !l.state.up);
        let on_lo = addr.is_loopback()
            || addrs.iter().any(|a| {
                a.local.addr() == addr && links.iter().any(|l| l.index == a.index && l.name == "lo")
            });
        if lo_down && on_lo {
            findings.push(format!("{addr} is a loopback address, and lo is down: the host cannot reach even its own loopback (a fresh network namespace starts so)"));
            next.push("ip link set lo up".into());
        } else if let Some(rule) = refusing_rule(&mut nl, addr, "unreachable") {
            findings.push(format!(
                "a policy rule refuses it: {} (\"Network is unreachable\"){}",
                rule_text(&rule),
                if rule.narrowed {
                    ", for the packets it matches"
                } else {
                    ""
                }
            ));
            next.push(rule_del(&rule));
        } else {
            findings.push(format!("the kernel has no route to {addr}: packets to it are not sent anywhere (\"Network is unreachable\")"));
            next.push(format!(
                "add one: tapir dev set DEV --route {addr}/{} (or a subnet holding it)",
                if addr.is_ipv4() { 32 } else { 128 }
            ));
        }
        return Ok(Explanation {
            subject,
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
            "table": (route.table != 0).then_some(route.table),
        }
    });
    // A local address's route goes through lo: name the device that has it.
    let dev = if route.kind == "local" {
        addrs
            .iter()
            .find(|a| a.local.addr() == addr)
            .and_then(|a| links.iter().find(|l| l.index == a.index))
            .map(|l| l.name.clone())
            .or(dev)
    } else {
        dev
    };
    let table = |t: u32| match t {
        254 => " (table 254, main)".to_string(),
        255 => " (table 255, local)".to_string(),
        0 => String::new(),
        t => format!(" (table {t}, chosen by a policy rule: ip rule)"),
    };
    match route.kind.as_str() {
        "local" => {
            let lo_up = links.iter().find(|l| l.name == "lo").is_some_and(|l| l.state.up);
            findings.push(format!(
                "{addr} is an address of this host{}: the kernel answers it itself, through lo; nothing reaches a tun/tap device, so your program reads nothing{}",
                dev.as_deref().filter(|d| *d != "lo").map(|d| format!(" (on {d})")).unwrap_or_default(),
                if lo_up { " (and a ping works without it)" } else { "" }
            ));
            if !lo_up {
                findings.push("lo is down: the host cannot reach even its own addresses (a fresh network namespace starts so)".into());
                next.push("ip link set lo up".into());
            }
            let view = dev.as_deref().and_then(tun_view);
            if let Some(v) = view.as_ref().filter(|v| !v.up) {
                findings.push(format!(
                    "{} is down: the host still answers {addr} (an address is the host's, whatever its link's state), but nothing is routed into {}",
                    v.ifname, v.ifname
                ));
            }
            // Another address of the same subnet, if it is an up tun/tap's
            // (not the subnet's first: in IPv6 the router anycast address,
            // which the host answers itself while it forwards).
            let other = addrs
                .iter()
                .find(|a| a.local.addr() == addr && a.peer.is_none())
                .filter(|a| view.as_ref().is_some_and(|v| v.up) && a.local.prefix_len() < if addr.is_ipv4() { 31 } else { 127 })
                .and_then(|a| a.local.hosts().find(|h| *h != addr && *h != a.local.network()));
            if view.is_some() {
                next.push(format!(
                    "to see packets in your program, send to another address routed into the device{}; tapir explain {} shows its routes",
                    other.map(|o| format!(" (ping {o})")).unwrap_or_default(),
                    dev.as_deref().map_or("DEV".into(), sh)
                ));
            }
        }
        "unicast" => {
            let via = route
                .gateway
                .map(|g| format!(" via {g}"))
                .unwrap_or_default();
            let name = dev.clone().unwrap_or_else(|| "?".into());
            // One path of several: the kernel picks one per flow.
            let paths = nl
                .routes_in(route.table)?
                .into_iter()
                .filter(|r| r.kind == "unicast" && r.dst.contains(&addr))
                .max_by_key(|r| r.dst.prefix_len())
                .map_or(0, |r| r.nexthops.len());
            findings.push(format!(
                "{addr} is routed out of {name}{via}{}, with source {}{}",
                table(route.table),
                route.source.map_or("-".to_string(), |s| s.to_string()),
                if paths > 1 {
                    format!(": one of the {paths} paths of a multipath route (the kernel picks one per flow)")
                } else {
                    String::new()
                }
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
                    next.push(format!("tapir dev set {} --up", sh(&name)));
                } else if !v.open {
                    findings.push(format!(
                        "{name} is a {} device that no process holds: its carrier is down, so what is routed there is dropped, and tcpdump on it shows nothing",
                        v.mode
                    ));
                    next.push(format!("start the program that reads {name} (tapir echo {}, tapir dump {}, or your own)", sh(&name), sh(&name)));
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
            // (Toward the internet: through a gateway, or out of a plain
            // link; a host on a guest bridge itself is not that.)
            let on_guest_link = links
                .iter()
                .any(|l| l.name == name && (l.kind.as_deref() == Some("bridge") || l.is_tun()));
            if tun_view(&name).is_none() && addr.is_ipv4() && (route.gateway.is_some() || !on_guest_link) {
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
            let tap = tun_view(&name).is_some_and(|v| v.mode == "tap");
            if let Some((peer, peers)) = tunnel_peer(&name, addr) {
                facts["tunnel"] = serde_json::json!({ "peers": peers, "peer": peer.as_ref().map(|p| &p.0), "allowed_ip": peer.as_ref().map(|p| &p.1), "latest_handshake": peer.as_ref().map(|p| p.2), "mode": if tap { "tap" } else { "tun" } });
                match peer {
                    // An Ethernet segment: frames go by MAC, and allowed
                    // IPs only bound what a peer may send from (it said the
                    // tunnel drops it, and to add it to a peer's allowed
                    // IPs, which cut that peer off from the rest).
                    _ if tap => findings.push(format!(
                        "{name} is a tapir tunnel in tap mode, an Ethernet segment of its {peers} peer(s): a frame to {addr} goes to the peer that {addr}'s MAC was learned from (to every peer until it is known); allowed IPs only bound what addresses a peer may send from"
                    )),
                    Some((key, net, 0)) => {
                        findings.push(format!("{name} is a tapir tunnel; peer {key} covers {addr} (allowed IP {net}) but has never completed a handshake"));
                        next.push(format!("check that peer's Endpoint and that UDP reaches it (tapir status {})", sh(&name)));
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
                            "add it to a peer's AllowedIPs (wg set {} peer KEY allowed-ips ...)",
                            sh(&name)
                        ));
                    }
                }
            }
        }
        "broadcast" => findings.push(format!(
            "{addr} is a broadcast address{}: what is sent to it goes to every host of that subnet (ping -b {addr})",
            dev.as_deref().map(|d| format!(" of {d}'s subnet")).unwrap_or_default()
        )),
        "multicast" => findings.push(format!(
            "{addr} is a multicast address: sent out of {} to the hosts that joined the group",
            dev.as_deref().unwrap_or("the interface the sender chooses")
        )),
        "blackhole" | "prohibit" | "unreachable" => {
            let what = match route.kind.as_str() {
                "blackhole" => "packets to it are dropped silently",
                "prohibit" => "packets to it are refused (the sender gets \"Permission denied\", an ICMP prohibited)",
                _ => "packets to it are refused (the sender gets \"No route to host\")",
            };
            // A route of that type, or a policy rule with that action
            // (the kernel answers both alike).
            let by_route = nl
                .routes_all()?
                .into_iter()
                .filter(|r| r.kind == route.kind && r.dst.contains(&addr))
                .max_by_key(|r| r.dst.prefix_len());
            let by_rule = refusing_rule(&mut nl, addr, &route.kind);
            match (by_route, by_rule) {
                (Some(r), _) => {
                    findings.push(format!(
                        "{addr} is covered by a {} route ({} in table {}): {what}",
                        route.kind, r.dst, r.table
                    ));
                    next.push(format!(
                        "ip {}route del {} {} table {} sends {addr} elsewhere",
                        if addr.is_ipv6() { "-6 " } else { "" },
                        route.kind,
                        r.dst,
                        r.table
                    ));
                }
                (None, Some(rule)) => {
                    findings.push(format!(
                        "a policy rule refuses it: {}: {what}{}",
                        rule_text(&rule),
                        if rule.narrowed { " (for the packets it matches)" } else { "" }
                    ));
                    next.push(rule_del(&rule));
                }
                (None, None) => {
                    findings.push(format!("the kernel refuses {addr} as {}: {what}", route.kind));
                    next.push(format!(
                        "ip route show table all type {} and ip rule show: one of them does it",
                        route.kind
                    ));
                }
            }
        }
        "anycast" => {
            let on = addrs
                .iter()
                .find(|a| a.local.network() == addr)
                .and_then(|a| links.iter().find(|l| l.index == a.index))
                .map(|l| format!(" of {}", l.name));
            findings.push(format!(
                "{addr} is a subnet-router anycast address (the first of a subnet{}): the host answers it itself while it forwards IPv6; it is no other host's address",
                on.unwrap_or_default()
            ));
        }
        other => {
            findings.push(format!(
                "{addr} is routed as {other}{} (ip route get {addr} shows the same)",
                table(route.table)
            ));
        }
    }
    Ok(Explanation {
        subject,
        facts,
        findings,
        next,
    })
}

/// The bridge `link` is a port of, if it is one.
fn port_of<'a>(links: &'a [tapir_sys::Link], link: &tapir_sys::Link) -> Option<&'a str> {
    let m = link.master?;
    links.iter().find(|l| l.index == m).map(|l| l.name.as_str())
}

/// A route out of interface `index` as `ip route` words it, with its
/// table when not the main one.
fn route_words(r: &tapir_sys::Route, index: u32) -> String {
    format!(
        "{}{}{}{}",
        if r.dst.prefix_len() == 0 {
            "default".to_string()
        } else {
            r.dst.to_string()
        },
        r.gateway_on(index)
            .map(|g| format!(" via {g}"))
            .unwrap_or_default(),
        if r.table == tapir_sys::MAIN_TABLE {
            String::new()
        } else {
            format!(" (table {})", r.table)
        },
        if r.nexthops.is_empty() {
            ""
        } else {
            " (one path of several)"
        }
    )
}

/// A refusing rule as `ip rule` shows it.
fn rule_text(r: &tapir_sys::RefusingRule) -> String {
    format!(
        "ip {}rule pref {} {}{}",
        if r.v6 { "-6 " } else { "" },
        r.priority.map_or("?".into(), |p| p.to_string()),
        r.to.map(|t| format!("to {t} ")).unwrap_or_default(),
        r.action
    )
}

/// How to take a refusing rule away.
fn rule_del(r: &tapir_sys::RefusingRule) -> String {
    match r.priority {
        Some(p) => format!(
            "ip {}rule del pref {p} (ip rule show lists the rules)",
            if r.v6 { "-6 " } else { "" }
        ),
        None => "ip rule show lists it; ip rule del it".into(),
    }
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
    // Guests sit behind bridges and taps (a tun, a point-to-point link or a
    // tapir tunnel is not a guest network), on subnets with room for them.
    let guest_links: Vec<&tapir_sys::Link> = links
        .iter()
        .filter(|l| {
            l.kind.as_deref() == Some("bridge")
                || (l.is_tun()
                    && l.tun.as_ref().and_then(|t| t.mode) == Some(tapir_sys::Mode::Tap)
                    && crate::service::query(&l.name).is_err())
        })
        .filter(|l| l.name != out)
        .collect();
    let addrs = nl.addresses(None)?;
    let subnets: Vec<(String, ipnet::IpNet)> = addrs
        .iter()
        .filter(|a| a.local.addr().is_ipv4() && a.peer.is_none() && a.local.prefix_len() < 31)
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
        } else if !nat.iter().any(|e| e.source.contains(net) && e.out == out) {
            if own_masquerade() {
                findings.push(format!(
                    "tapir nat has no masquerade for {net} (on {link}) out of {out}; the firewall has masquerade or SNAT rules of its own (nft list ruleset): if none covers {net} out of {out}, guests' replies find no way back"
                ));
            } else {
                findings.push(format!(
                    "no masquerade for {net} (on {link}) out of {out}: guests' packets leave with their own addresses, and replies find no way back unless the next hop routes {net} to this host"
                ));
                next.push(format!("tapir nat enable --source {net} --out {out}"));
            }
        }
    }
    Ok(())
}

/// Whether the firewall has masquerade or SNAT rules that are not tapir
/// nat's (`nft list ruleset`; no nft: none known).
fn own_masquerade() -> bool {
    std::process::Command::new("nft")
        .args(["list", "ruleset"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| {
            let text = String::from_utf8_lossy(&o.stdout);
            let mut table = "";
            text.lines().any(|l| {
                let l = l.trim();
                if let Some(t) = l.strip_prefix("table ") {
                    table = t;
                }
                !table.contains(crate::nat::TABLE)
                    && (l.contains("masquerade") || l.contains("snat "))
            })
        })
}

/// `tapir explain DEV` for a link that is not tun/tap (veth, bridge, lo,
/// a NIC): what it is, its state, its addresses and the routes through it.
fn other_link(name: &IfName) -> Result<Explanation, DevError> {
    let mut nl = Netlink::open()?;
    let link = nl
        .link(name.as_str())?
        .ok_or_else(|| DevError::NotFound(format!("{name} (ip link shows the links there are)")))?;
    let links = nl.links()?;
    let addrs = nl.addresses(Some(link.index))?;
    let routes = nl.routes_out_of(Some(link.index))?;
    let kind = link.kind.clone().unwrap_or_else(|| {
        if name.as_str() == "lo" {
            "loopback".into()
        } else {
            "physical".into()
        }
    });
    let mut findings = vec![format!(
        "{name} is a {kind} link, {} (operstate {}), MTU {}{}",
        if link.state.up { "up" } else { "down" },
        link.operstate,
        link.mtu,
        link.master
            .and_then(|m| links.iter().find(|l| l.index == m))
            .map(|m| format!(", a port of {}", m.name))
            .unwrap_or_default()
    )];
    let mut next = Vec::new();
    if !link.state.up {
        findings.push(if addrs.is_empty() {
            "it is down: nothing is routed out of it".to_string()
        } else {
            "it is down: nothing is routed out of it (its subnets' routes come back when it is up), though the host still answers its addresses as its own".to_string()
        });
        next.push(format!("ip link set {} up", sh(name.as_str())));
    }
    if kind == "bridge" {
        let ports: Vec<String> = links
            .iter()
            .filter(|l| l.master == Some(link.index))
            .map(|l| l.name.clone())
            .collect();
        findings.push(if ports.is_empty() {
            "no port is on it: it reaches no one but this host".into()
        } else {
            format!("its ports: {}", ports.join(", "))
        });
    }
    for a in &addrs {
        findings.push(match a.peer {
            Some(p) if link.state.up => format!(
                "{} is the host's address here, with the other end {p} routed out of {name}",
                a.local.addr()
            ),
            _ => format!(
                "{} is the host's address here (answered through lo)",
                a.local
            ),
        });
    }
    if let Some(m) = port_of(&links, &link) {
        if !addrs.is_empty() {
            findings.push(format!("as a port of {m}, what arrives on {name} goes to the bridge: its own addresses are not reached from the link (put them on {m})"));
        }
    }
    let routed: Vec<String> = routes.iter().map(|r| route_words(r, link.index)).collect();
    if !routed.is_empty() {
        findings.push(format!("routed out of it: {}", routed.join(", ")));
    }
    Ok(Explanation {
        subject: name.to_string(),
        facts: serde_json::json!({
            "kind": kind,
            "up": link.state.up,
            "operstate": link.operstate,
            "mtu": link.mtu,
            "addresses": addrs.iter().map(|a| a.local.to_string()).collect::<Vec<_>>(),
            "routes": routed,
        }),
        findings,
        next,
    })
}

/// `tapir explain DEV`.
pub fn device(name: &IfName) -> Result<Explanation, DevError> {
    let v = match dev::show(name.as_str()) {
        Ok(v) => v,
        Err(DevError::NotTun { .. }) => return other_link(name),
        Err(e) => return Err(e),
    };
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
        findings.push(format!(
            "it is down: nothing is routed into it{}",
            if v.addresses.is_empty() {
                ""
            } else {
                " (its subnets' routes come back when it is up), though the host still answers its addresses as its own"
            }
        ));
        next.push(format!("tapir dev set {} --up", sh(name.as_str())));
    }
    if v.open {
        let held: Vec<String> = v
            .holders
            .iter()
            .map(|h| format!("{} (pid {})", h.command, h.pid))
            .collect();
        let who = if !held.is_empty() {
            held.join(", ")
        } else if nix::unistd::geteuid().is_root() {
            "a process of another namespace".to_string()
        } else {
            "a process this user may not look at (root names it)".to_string()
        };
        findings.push(if v.up {
            format!("held by {who}: what the kernel routes to it is read by that program (the carrier is up)")
        } else {
            format!("held by {who}: once it is up, what the kernel routes to it is read by that program")
        });
    } else {
        findings.push("no process holds it: its carrier is down, what is routed there is dropped (tx_dropped counts it), and tcpdump on it shows nothing".into());
        next.push(format!(
            "attach a program (tapir echo {}, tapir dump {}, or your own)",
            sh(name.as_str()),
            sh(name.as_str())
        ));
    }
    let mut nl = Netlink::open()?;
    let links = nl.links()?;
    if let Some(link) = links.iter().find(|l| l.index == v.ifindex) {
        if let Some(m) = port_of(&links, link) {
            findings.push(format!(
                "it is a port of {m}: what arrives on it goes to the bridge{}",
                if v.addresses.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", so its own addresses are not reached from the link (put them on {m})"
                    )
                }
            ));
        }
    }
    if v.addresses.is_empty() {
        findings.push(
            "it has no address: the host sends nothing through it unless a route points there"
                .into(),
        );
    }
    for a in &v.addresses {
        let host = a.prefixlen >= if a.local.is_ipv4() { 32 } else { 128 };
        findings.push(format!(
            "{}/{} is the host's own address here: pinging it is answered by the kernel through lo, never through {name}{}",
            a.local,
            a.prefixlen,
            match (&a.peer, host || !v.up) {
                (_, _) if !v.up => String::new(),
                (Some(p), _) => format!("; its other end {p} is routed into {name}"),
                (None, true) => String::new(),
                (None, false) => format!("; the other addresses of the subnet are routed into {name}"),
            }
        ));
    }
    let elsewhere: Vec<String> = v
        .routes
        .iter()
        .filter(|r| r.protocol != "kernel")
        .map(|r| {
            format!(
                "{}{}{}{}",
                r.dst,
                r.via.map(|g| format!(" via {g}")).unwrap_or_default(),
                r.table.map(|t| format!(" (table {t})")).unwrap_or_default(),
                if r.multipath {
                    " (one path of several)"
                } else {
                    ""
                }
            )
        })
        .collect();
    if !elsewhere.is_empty() {
        findings.push(format!("routed into it: {}", elsewhere.join(", ")));
    } else if v.up && !v.addresses.is_empty() {
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
