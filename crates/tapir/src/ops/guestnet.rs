//! `tapir guest-net`: libvirt's default network without libvirt. A bridge
//! with the subnet's first address, NAT out of an interface if asked, and a
//! small DHCP server on the bridge; all of it taken back by `down`.
//!
//! ```text
//!   up NAME --subnet S [--out O] [--dns D] ─▶ bridge NAME (a fixed MAC), S's first address, up
//!                                ─▶ tapir nat enable --source S --out O
//!                                ─▶ `tapir guest-net serve` in the background: DHCP on NAME
//!                                     (leases in the run directory, for status), the name
//!                                     servers D or, with NAT, the host's
//!   qemu-ifup --bridge NAME      ─▶ a booting guest gets an address, nothing set inside it
//!   down NAME                    ─▶ the server stopped, NAT taken back, the bridge gone
//! ```

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};
use tapir_proto::dhcp::Pool;
use tapir_sys::{IfName, Netlink};

use crate::dev::DevError;
use crate::scope::Scope;
use crate::service::Dirs;

/// How long a DHCP lease lasts.
pub const LEASE_TIME: Duration = Duration::from_secs(3600);

/// What `up` set up, kept for `down` and `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// The subnet.
    pub subnet: String,
    /// NAT out of this interface, if asked.
    pub out: Option<String>,
    /// Whether `up` enabled the NAT (and `down` takes it back).
    pub nat_ours: bool,
    /// The name servers the guests are given.
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    /// The DHCP server's process.
    pub pid: i32,
}

/// One lease, as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseView {
    /// The guest's MAC.
    pub mac: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Acknowledged (else only offered).
    pub bound: bool,
    /// Unix time it ends.
    pub expires: u64,
    /// The host name it gave.
    pub hostname: Option<String>,
}

/// What `status` shows.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The bridge.
    pub name: String,
    /// The state recorded by `up`.
    pub state: State,
    /// Whether the DHCP server runs.
    pub dhcp_running: bool,
    /// Whether the bridge is there.
    pub bridge_present: bool,
    /// The leases given.
    pub leases: Vec<LeaseView>,
}

fn files(dirs: &Dirs, name: &IfName) -> Result<(PathBuf, PathBuf), String> {
    let scope = Scope::current()?;
    let here = scope.dir(&dirs.run);
    Ok((
        here.join(format!("guest-net-{name}.json")),
        here.join(format!("guest-net-{name}.leases")),
    ))
}

/// Parses and checks a guest subnet: IPv4, /8 to /30.
pub fn parse_subnet(s: &str) -> Result<Ipv4Net, String> {
    match crate::dev::parse_addr(s)? {
        IpNet::V4(n) if (8..=30).contains(&n.prefix_len()) => Ok(n.trunc()),
        IpNet::V4(n) => Err(format!(
            "--subnet {n}: give a prefix from /8 to /30 (room for the bridge and guests)"
        )),
        IpNet::V6(_) => Err("--subnet: an IPv4 subnet (DHCPv4 hands out its addresses)".into()),
    }
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.contains("guest-net") && c.contains("serve"))
}

fn stop(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The name servers of `resolv_conf` (its text) that a guest can reach
/// through NAT: IPv4, not loopback (systemd-resolved's 127.0.0.53 answers
/// the host only; then its upstream ones, from `upstream`, the text of
/// /run/systemd/resolve/resolv.conf).
pub fn host_name_servers(resolv_conf: &str, upstream: Option<&str>) -> Vec<Ipv4Addr> {
    let servers = |text: &str| -> Vec<Ipv4Addr> {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
            .filter(|a| !a.is_loopback() && !a.is_unspecified())
            .collect()
    };
    let mine = servers(resolv_conf);
    if mine.is_empty() {
        upstream.map(servers).unwrap_or_default()
    } else {
        mine
    }
}

/// A bridge's MAC, fixed at creation: otherwise a bridge takes its ports'
/// smallest, so the guests' gateway MAC changed as guests came and went
/// (and was all zeros with none), their ARP entries stale meanwhile.
fn bridge_mac(name: &IfName) -> [u8; 6] {
    crate::tunnel::local_mac(&[b"tapir guest-net bridge", name.as_str().as_bytes()])
}

/// What in this namespace already uses `subnet`: an address of an
/// interface (a guest network's too) in it or around it, or a route of the
/// main table to it or to a part of it (libvirt refuses a route to the same
/// network). A route around it (a VPN's 0.0.0.0/1, a 10.0.0.0/8 elsewhere)
/// is not: the bridge's own route, more specific, wins.
pub(crate) fn in_use(nl: &mut Netlink, subnet: Ipv4Net) -> Result<Option<String>, String> {
    let overlaps = |n: &IpNet| match n.trunc() {
        IpNet::V4(n) => n.contains(&subnet.network()) || subnet.contains(&n.network()),
        IpNet::V6(_) => false,
    };
    let inside = |n: &IpNet| match n.trunc() {
        IpNet::V4(n) => subnet.contains(&n.network()),
        IpNet::V6(_) => false,
    };
    let links = nl.links().map_err(|e| e.to_string())?;
    let dev = |i: u32| {
        links
            .iter()
            .find(|l| l.index == i)
            .map_or_else(|| format!("interface {i}"), |l| l.name.to_string())
    };
    if let Some(a) = nl
        .addresses(None)
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|a| overlaps(&a.local) && a.scope != "host")
    {
        return Ok(Some(format!("{} on {}", a.local, dev(a.index))));
    }
    Ok(nl
        .routes(None)
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|r| {
            r.table == tapir_sys::MAIN_TABLE
                && r.kind == "unicast"
                && r.dst.prefix_len() > 0
                && inside(&r.dst)
        })
        .map(|r| {
            let via = r.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
            let on = r
                .oif
                .map(|i| format!(" dev {}", dev(i)))
                .unwrap_or_default();
            format!("the route {}{via}{on}", r.dst)
        }))
}

/// Sets the guest network up (see the module's words); what it did. `dns`:
/// the name servers to give the guests (none given: with NAT, the host's).
pub fn up(
    tapir: &Path,
    name: &IfName,
    subnet: Ipv4Net,
    out: Option<&str>,
    dns: &[Ipv4Addr],
    dirs: &Dirs,
) -> Result<Vec<String>, String> {
    let (state_file, leases_file) = files(dirs, name)?;
    match read_state(&state_file) {
        Some(s) if alive(s.pid) => {
            // Up as asked: nothing to do. Otherwise the difference is
            // named, not dropped unsaid (as `dev add` and [[device]] do).
            let mut differs = Vec::new();
            if s.subnet != subnet.to_string() {
                differs.push(format!("its subnet is {}, not {subnet}", s.subnet));
            }
            if s.out.as_deref() != out {
                differs.push(match (&s.out, out) {
                    (Some(was), Some(o)) => format!("its NAT goes out of {was}, not {o}"),
                    (Some(was), None) => format!("it has NAT out of {was}, not none"),
                    _ => "it has no NAT".to_string(),
                });
            }
            if !dns.is_empty() && s.dns != dns {
                differs.push("its guests have other name servers".to_string());
            }
            if !differs.is_empty() {
                return Err(format!(
                    "{name} is already up, not as asked: {}; to change it: tapir guest-net down {name}, then up again",
                    differs.join(", ")
                ));
            }
            return Ok(vec![format!(
                "{name} is already up ({}, DHCP pid {}): nothing changed",
                s.subnet, s.pid
            )]);
        }
        Some(s) => {
            return Err(format!(
                "{name} is a guest network of tapir's whose DHCP server (pid {}) is gone: take it down first (tapir guest-net down {name}), then up again",
                s.pid
            ));
        }
        None => {}
    }
    let dns: Vec<Ipv4Addr> = if !dns.is_empty() || out.is_none() {
        dns.to_vec()
    } else {
        host_name_servers(
            &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            std::fs::read_to_string("/run/systemd/resolve/resolv.conf")
                .ok()
                .as_deref(),
        )
    };
    let scope = Scope::current()?;
    dirs.ensure(&scope)?;
    let server = subnet.hosts().next().ok_or("--subnet: no host addresses")?;
    let mut nl = Netlink::open().map_err(|e| e.to_string())?;
    if nl.link(name.as_str()).map_err(|e| e.to_string())?.is_some() {
        return Err(format!(
            "{name} already exists: choose another name for the guest network"
        ));
    }
    if let Some(what) = in_use(&mut nl, subnet)? {
        return Err(format!(
            "--subnet {subnet} is in use here ({what}): a bridge on it would take the host's own traffic or answer beside it; choose another subnet"
        ));
    }
    let mut done = Vec::new();
    let index = nl.add_bridge(name.as_str()).map_err(|e| e.to_string())?;
    // From here, a failure takes back what was done.
    let mut nat_ours = false;
    let result = (|| -> Result<i32, String> {
        nl.set_mac(index, bridge_mac(name))
            .map_err(|e| e.to_string())?;
        let addr = IpNet::V4(Ipv4Net::new(server, subnet.prefix_len()).map_err(|e| e.to_string())?);
        nl.add_address(index, addr, None)
            .map_err(|e| e.to_string())?;
        nl.set_up(index, true).map_err(|e| e.to_string())?;
        done.push(format!("bridge {name} with {addr}"));
        if let Some(o) = out {
            let e = crate::nat::Entry {
                source: IpNet::V4(subnet),
                out: o.to_owned(),
            };
            nat_ours = crate::nat::enable(&e, &dirs.run)?;
            done.push(format!("NAT for {subnet} out of {o}"));
        }
        let _ = std::fs::remove_file(&leases_file);
        let log = scope.dir(&dirs.log).join(format!("guest-net-{name}.log"));
        let mut cmd = Command::new(tapir);
        cmd.args(["guest-net", "serve", name.as_str(), "--subnet"])
            .arg(subnet.to_string())
            .arg("--run-dir")
            .arg(&dirs.run);
        if !dns.is_empty() {
            let list: Vec<String> = dns.iter().map(Ipv4Addr::to_string).collect();
            cmd.arg("--dns").arg(list.join(","));
        }
        let (mut child, _) = crate::service::spawn_daemon(cmd, &log)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !leases_file.exists() {
            if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!(
                    "the DHCP server did not start ({st}): {}",
                    text.lines().last().unwrap_or("")
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!(
                    "the DHCP server did not start; see {}",
                    log.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        done.push(format!(
            "DHCP on {name}: {subnet}, leases of {} s, {}",
            LEASE_TIME.as_secs(),
            if dns.is_empty() {
                "no name server (give --dns)".to_string()
            } else {
                format!(
                    "name servers {}",
                    dns.iter()
                        .map(Ipv4Addr::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        ));
        Ok(child.id() as i32)
    })();
    match result {
        Ok(pid) => {
            let state = State {
                subnet: subnet.to_string(),
                out: out.map(str::to_owned),
                nat_ours,
                dns,
                pid,
            };
            let text = serde_json::to_string(&state).map_err(|e| e.to_string())?;
            std::fs::write(&state_file, text)
                .map_err(|e| format!("{}: {e}", state_file.display()))?;
            Ok(done)
        }
        Err(e) => {
            if nat_ours {
                let entry = crate::nat::Entry {
                    source: IpNet::V4(subnet),
                    out: out.unwrap_or_default().to_owned(),
                };
                let _ = crate::nat::disable(Some(&entry), &dirs.run);
            }
            let _ = nl.del_link(index);
            Err(format!("{e}; nothing is left"))
        }
    }
}

fn read_state(path: &Path) -> Option<State> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// Takes the guest network back; what it did.
pub fn down(name: &IfName, dirs: &Dirs) -> Result<Vec<String>, String> {
    let (state_file, leases_file) = files(dirs, name)?;
    let Some(state) = read_state(&state_file) else {
        return Err(format!(
            "{name} is not a guest network of tapir here (no {})",
            state_file.display()
        ));
    };
    let mut done = Vec::new();
    if alive(state.pid) {
        stop(state.pid);
        done.push("DHCP server stopped".to_string());
    }
    if let (true, Some(o)) = (state.nat_ours, &state.out) {
        let entry = crate::nat::Entry {
            source: state.subnet.parse().map_err(|_| "a broken state file")?,
            out: o.clone(),
        };
        crate::nat::disable(Some(&entry), &dirs.run)?;
        done.push(format!("NAT for {} out of {o} taken back", state.subnet));
    }
    let mut nl = Netlink::open().map_err(|e| e.to_string())?;
    if let Some(l) = nl.link(name.as_str()).map_err(|e| e.to_string())? {
        nl.del_link(l.index).map_err(|e| e.to_string())?;
        done.push(format!("bridge {name} removed"));
    }
    let _ = std::fs::remove_file(&state_file);
    let _ = std::fs::remove_file(&leases_file);
    Ok(done)
}

/// The guest network's state and leases.
pub fn status(name: &IfName, dirs: &Dirs) -> Result<Status, String> {
    let (state_file, leases_file) = files(dirs, name)?;
    let state = read_state(&state_file).ok_or_else(|| {
        format!(
            "{name} is not a guest network of tapir here (tapir guest-net up {name} --subnet CIDR)"
        )
    })?;
    let leases = std::fs::read_to_string(&leases_file)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let bridge_present = Netlink::open()
        .and_then(|mut nl| nl.link(name.as_str()))
        .is_ok_and(|l| l.is_some());
    Ok(Status {
        name: name.to_string(),
        dhcp_running: alive(state.pid),
        bridge_present,
        state,
        leases,
    })
}

fn mac_text(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The DHCP server of guest network `name`, in the foreground, until
/// `shutdown` or until the bridge goes.
pub fn serve(
    name: &IfName,
    subnet: Ipv4Net,
    dns: Vec<Ipv4Addr>,
    run_dir: &Path,
    shutdown: &AtomicBool,
) -> Result<(), DevError> {
    let server = subnet
        .hosts()
        .next()
        .ok_or_else(|| DevError::Invalid("--subnet: no host addresses".into()))?;
    let scope = Scope::current().map_err(DevError::Runtime)?;
    let leases_file = scope.dir(run_dir).join(format!("guest-net-{name}.leases"));
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
        .map_err(|e| DevError::Runtime(format!("DHCP socket: {e}")))?;
    let setup = |s: &socket2::Socket| -> std::io::Result<()> {
        s.set_reuse_address(true)?;
        s.set_broadcast(true)?;
        // Only the guests on this bridge: another interface's DHCP is not ours.
        s.bind_device(Some(name.as_str().as_bytes()))?;
        s.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 67)).into())?;
        s.set_read_timeout(Some(Duration::from_millis(500)))
    };
    setup(&sock).map_err(|e| {
        DevError::Runtime(format!(
            "DHCP on {name} (UDP port 67): {e}{}",
            if e.kind() == std::io::ErrorKind::AddrInUse {
                " (another DHCP server, such as dnsmasq, serves this bridge)"
            } else {
                ""
            }
        ))
    })?;
    let sock: std::net::UdpSocket = sock.into();
    let mut pool = Pool::new(subnet, server, LEASE_TIME).with_dns(dns);
    let start = Instant::now();
    let write = |pool: &Pool| {
        let now = Instant::now();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let view: Vec<LeaseView> = pool
            .leases(now)
            .map(|l| LeaseView {
                mac: mac_text(&l.mac),
                ip: l.ip,
                bound: l.bound,
                expires: (wall + l.expires.saturating_duration_since(now)).as_secs(),
                hostname: l.hostname.clone(),
            })
            .collect();
        let tmp = leases_file.with_extension("leases.tmp");
        if std::fs::write(&tmp, serde_json::to_string(&view).unwrap_or_default()).is_ok() {
            let _ = std::fs::rename(&tmp, &leases_file);
        }
    };
    write(&pool);
    eprintln!("tapir: guest-net {name}: DHCP for {subnet} on {name}, server {server}");
    let mut buf = [0u8; 1500];
    let mut last_check = start;
    while !shutdown.load(Ordering::Relaxed) {
        match sock.recv_from(&mut buf) {
            Ok((n, _from)) => {
                if let Some(reply) = pool.handle(Instant::now(), &buf[..n]) {
                    let to = SocketAddr::V4(reply_to(&reply));
                    if let Err(e) = sock.send_to(&reply, to) {
                        eprintln!("tapir: guest-net {name}: sending a DHCP reply: {e}");
                    }
                }
                write(&pool);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(DevError::Runtime(format!("DHCP on {name}: {e}"))),
        }
        if last_check.elapsed() >= Duration::from_secs(1) {
            last_check = Instant::now();
            let present = Netlink::open()
                .and_then(|mut nl| nl.link(name.as_str()))
                .is_ok_and(|l| l.is_some());
            if !present {
                eprintln!("tapir: guest-net {name}: the bridge is gone: stopping");
                break;
            }
            write(&pool);
        }
    }
    Ok(())
}

/// Where a DHCP reply goes (RFC 2131 4.1, no relay): to a client that has
/// an address (`ciaddr`: renewing, or asking with DHCPINFORM), at it, where
/// its socket bound to that address hears it; to one that has none yet,
/// broadcast.
fn reply_to(reply: &[u8]) -> SocketAddrV4 {
    let ciaddr = reply
        .get(12..16)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(Ipv4Addr::UNSPECIFIED, Ipv4Addr::from);
    if ciaddr.is_unspecified() {
        SocketAddrV4::new(Ipv4Addr::BROADCAST, 68)
    } else {
        SocketAddrV4::new(ciaddr, 68)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guests_get_the_name_servers_they_can_reach() {
        let plain = "# comment\nnameserver 192.0.2.53\nnameserver 2001:db8::53\nsearch example\n";
        assert_eq!(
            host_name_servers(plain, None),
            vec![Ipv4Addr::new(192, 0, 2, 53)]
        );
        // systemd-resolved's stub: its upstream servers instead.
        let stub = "nameserver 127.0.0.53\noptions edns0 trust-ad\n";
        let upstream = "nameserver 198.51.100.1\nnameserver 198.51.100.2\n";
        assert_eq!(
            host_name_servers(stub, Some(upstream)),
            vec![
                Ipv4Addr::new(198, 51, 100, 1),
                Ipv4Addr::new(198, 51, 100, 2)
            ]
        );
        assert!(host_name_servers(stub, None).is_empty());
        assert!(host_name_servers("", None).is_empty());
    }

    #[test]
    fn a_reply_goes_to_a_client_with_an_address_at_it_and_broadcast_otherwise() {
        let mut reply = vec![0u8; 240];
        reply[0] = 2;
        assert_eq!(reply_to(&reply), SocketAddrV4::new(Ipv4Addr::BROADCAST, 68));
        reply[12..16].copy_from_slice(&[192, 168, 77, 5]);
        assert_eq!(
            reply_to(&reply),
            SocketAddrV4::new(Ipv4Addr::new(192, 168, 77, 5), 68)
        );
        assert_eq!(reply_to(&[]), SocketAddrV4::new(Ipv4Addr::BROADCAST, 68));
    }
}
