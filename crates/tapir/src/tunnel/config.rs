//! Tunnel configuration, from two kinds of file:
//!
//! - wg-quick files (`[Interface]` / `[Peer]`), so that a WireGuard user can
//!   switch without rewriting anything; the interface is named after the
//!   file (`tp0.conf` gives `tp0`);
//! - tapir's TOML (`*.toml`), with one or more `[[tunnel]]` tables, each with
//!   its `[[tunnel.peer]]` tables (see [`load_toml`]).
//!
//! Every error names the file, the line and the key. Everything is checked
//! here, before any kernel call.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use tapir_proto::wg::keys::{PresharedKey, PrivateKey, PublicKey};
use tapir_sys::IfName;
use zeroize::Zeroize;

/// The default MTU of a WireGuard interface (1500 minus 80 bytes of IPv6 + UDP + WireGuard).
pub const DEFAULT_MTU: u32 = 1420;
/// The default MTU of a tap-mode tunnel: the 1420 of a tun, less the
/// 14-byte Ethernet header that each frame carries (frames are not padded).
pub const DEFAULT_TAP_MTU: u32 = DEFAULT_MTU - 14;

/// How a tunnel's messages travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// UDP datagrams (WireGuard).
    #[default]
    Udp,
    /// A TCP stream, each message behind a 16-bit big-endian length (udp2tcp's framing).
    Tcp,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        })
    }
}

fn parse_transport(s: &str) -> Result<Transport, String> {
    match s.to_ascii_lowercase().as_str() {
        "udp" => Ok(Transport::Udp),
        "tcp" => Ok(Transport::Tcp),
        _ => Err(format!("{s:?} is not a transport: use udp or tcp")),
    }
}

/// What is said of an address a list gives twice (the kernel refuses the
/// second: "File exists", from deep in the start).
fn twice(first: &IpNet, again: &IpNet) -> String {
    format!(
        "{} is given twice ({first} and {again}): a device has an address once",
        again.addr()
    )
}

fn parse_mode(s: &str) -> Result<tapir_sys::Mode, String> {
    s.to_ascii_lowercase()
        .parse()
        .map_err(|_| format!("{s:?} is not a mode: use tun (IP packets) or tap (Ethernet frames)"))
}

/// Parses a rate as VTun and tc write it: `20mbit`, `512kbit`, `1gbit`, or
/// bits per second; returns bits per second.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let (digits, unit) = t.split_at(
        t.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(t.len()),
    );
    let scale: f64 = match unit.trim() {
        "" | "bit" | "bps" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        _ => {
            return Err(format!(
                "{s:?} is not a rate: write it as 20mbit, 512kbit or 1gbit"
            ));
        }
    };
    let n: f64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a rate: write it as 20mbit, 512kbit or 1gbit"))?;
    let bits = n * scale;
    if !(8000.0..=1e12).contains(&bits) {
        return Err(format!("{s:?} is out of range: from 8kbit to 1000gbit"));
    }
    Ok(bits as u64)
}

/// Which routing table a tunnel's routes go to (wg-quick's `Table`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Table {
    /// The main table, but default routes (`0.0.0.0/0`, `::/0`) through a
    /// table of their own with policy rules, as wg-quick does.
    #[default]
    Auto,
    /// No routes at all.
    Off,
    /// Every route in this table, and no rules.
    Id(u32),
}

fn parse_table(s: &str) -> Result<Table, String> {
    match s.to_ascii_lowercase().as_str() {
        "auto" => Ok(Table::Auto),
        "off" => Ok(Table::Off),
        "main" => Ok(Table::Id(254)),
        v => match v.parse::<u32>() {
            Ok(n) if n > 0 && n != 255 => Ok(Table::Id(n)),
            _ => Err(format!(
                "{s:?} is not a routing table: use auto, off, main or a number (1 to 2^32-1, not 255)"
            )),
        },
    }
}

fn parse_fwmark(s: &str) -> Result<Option<u32>, String> {
    let t = s.trim().to_ascii_lowercase();
    if t == "off" || t == "0" {
        return Ok(None);
    }
    let n = match t.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => t.parse::<u32>(),
    };
    n.map(Some)
        .map_err(|_| format!("{s:?} is not a firewall mark: a number (51820 or 0xca6c), or off"))
}

/// What wg-quick does around a tunnel besides the device: routing table and
/// mark, hooks, DNS, saving the peers back.
#[derive(Debug, Clone, Default)]
pub struct Ops {
    /// Where routes go.
    pub table: Table,
    /// The mark on the tunnel's own packets (and, with default routes, the
    /// table they use); chosen from 51820 up when a default route needs one.
    pub fwmark: Option<u32>,
    /// Shell commands (`%i`: the interface), in wg-quick's order.
    pub pre_up: Vec<String>,
    /// After the device, addresses, routes and DNS are set.
    pub post_up: Vec<String>,
    /// Before the device goes.
    pub pre_down: Vec<String>,
    /// After it went.
    pub post_down: Vec<String>,
    /// Name servers and search domains, for resolvconf.
    pub dns: Vec<String>,
    /// Write the peers back to the file on down (wg-quick's `SaveConfig`).
    pub save_config: bool,
    /// Run as this user once set up (tapir's `User`), keeping CAP_NET_ADMIN.
    pub user: Option<String>,
}

/// One tunnel: an interface and its peers.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// Where it was read from.
    pub file: PathBuf,
    /// The interface name.
    pub name: IfName,
    /// Our private key.
    pub private_key: PrivateKey,
    /// UDP port to listen on (random if absent).
    pub listen_port: Option<u16>,
    /// Addresses of the interface.
    pub addresses: Vec<IpNet>,
    /// MTU.
    pub mtu: u32,
    /// No MTU given: the tunnel takes the one wg-quick would (see
    /// `tunnel::auto_mtu`); `mtu` is then the default, for where there is
    /// no route to go by.
    pub mtu_auto: bool,
    /// tun (IP packets, routed by allowed IPs) or tap (Ethernet frames, switched).
    pub mode: tapir_sys::Mode,
    /// Tap mode: the device's MAC (if absent, one made from the key and
    /// name, the same at every start).
    pub mac: Option<[u8; 6]>,
    /// Tap mode: a Linux bridge to join (created if missing, removed on down if created).
    pub bridge: Option<IfName>,
    /// UDP or TCP.
    pub transport: Transport,
    /// Routes into the tunnel; `None`: one per allowed IP of every peer.
    pub routes: Option<Vec<IpNet>>,
    /// Peers.
    pub peers: Vec<PeerEntry>,
    /// Things the user should know (unsupported keys, loose permissions).
    pub warnings: Vec<String>,
    /// Routing table and mark, hooks, DNS, SaveConfig.
    pub ops: Ops,
}

/// A `[Peer]` section.
#[derive(Debug, Clone)]
pub struct PeerEntry {
    /// Its public key.
    pub public_key: PublicKey,
    /// Preshared key.
    pub psk: Option<PresharedKey>,
    /// `host:port`, resolved when the tunnel starts.
    pub endpoint: Option<String>,
    /// Allowed IPs.
    pub allowed_ips: Vec<IpNet>,
    /// Persistent keepalive, seconds (`Some(0)`: off, as the file says).
    pub keepalive: Option<u16>,
    /// Rate limit in bits per second, each direction.
    pub rate: Option<u64>,
    /// Line of its `[Peer]` header, for messages.
    pub line: usize,
    /// Line of its endpoint (its header's if none), for messages.
    pub endpoint_line: usize,
}

/// A configuration error: file, line, key, and what to do.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}{}: {}{msg}", file.display(), if *line > 0 { format!(":{line}") } else { String::new() }, key.as_ref().map(|k| format!("{k}: ")).unwrap_or_default())]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line (0: the file as a whole).
    pub line: usize,
    /// The key at fault.
    pub key: Option<String>,
    /// What is wrong.
    pub msg: String,
}

/// Refuses hooks (PreUp, PostUp, PreDown, PostDown: shell commands, run
/// with our privileges, root's as a rule) from a file that someone else
/// could have written: one another user owns or may write to, or in a
/// directory where they could put another in its place. Such a user
/// would have root at the tunnel's next start.
pub fn hooks_are_ours(c: &TunnelConfig) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let o = &c.ops;
    let stage = [
        ("PreUp", &o.pre_up),
        ("PostUp", &o.post_up),
        ("PreDown", &o.pre_down),
        ("PostDown", &o.post_down),
    ]
    .into_iter()
    .find(|(_, cmds)| !cmds.is_empty())
    .map(|(s, _)| s);
    let Some(stage) = stage else {
        return Ok(());
    };
    let file = &c.file;
    let m = std::fs::metadata(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    let why = if !crate::uapi::root_or_us(m.uid()) {
        Some(format!("belongs to uid {}", m.uid()))
    } else if m.mode() & 0o022 != 0 {
        Some(format!(
            "is writable by group or others (mode {:o})",
            m.mode() & 0o777
        ))
    } else {
        None
    };
    if let Some(why) = why {
        return Err(format!(
            "{}: its {stage} runs as uid {me}, and the file {why}, who could make it run anything: chown root:root {0}; chmod go-w {0}",
            file.display()
        ));
    }
    // Reached through a link: the link too, and the directory it is in
    // (whoever may replace the link chooses the file).
    let link = std::fs::symlink_metadata(file).map_err(|e| format!("{}: {e}", file.display()))?;
    if link.file_type().is_symlink() {
        if !crate::uapi::root_or_us(link.uid()) {
            return Err(format!(
                "{}: its {stage} runs as uid {me}, and the link {0} belongs to uid {}, who could point it elsewhere: make the link root's, or give the file's own path",
                file.display(),
                link.uid()
            ));
        }
        let dir = file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        crate::uapi::trusted_dir_and_above(dir)
            .map_err(|e| format!("{}: its {stage} runs as uid {me}, and {e}", file.display()))?;
    }
    // Its directory, and each above it.
    crate::uapi::trusted_above(file)
        .map_err(|e| format!("{}: its {stage} runs as uid {me}, and {e}", file.display()))
}

/// Reads a wg-quick style file.
pub fn load(path: &Path) -> Result<TunnelConfig, ConfigError> {
    let err = |line, key: Option<&str>, msg: String| ConfigError {
        file: path.to_owned(),
        line,
        key: key.map(str::to_owned),
        msg,
    };
    // NAME.conf, as wg-quick takes it (qh2.txt ran qh2, and `.conf` an
    // interface named `.conf`).
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|_| path.extension().is_some_and(|e| e == "conf"))
        .ok_or_else(|| {
            err(
                0,
                None,
                "cannot name the interface after this file: call it NAME.conf (a wg-quick file; the interface is NAME) or NAME.toml (tapir's)".into(),
            )
        })?;
    let name = IfName::new(stem).map_err(|e| {
        err(
            0,
            None,
            format!("the file name gives the interface name: {e}"),
        )
    })?;
    if name.is_template() {
        return Err(err(
            0,
            None,
            "the file name gives the interface name, which may not contain '%'".into(),
        ));
    }
    let meta = std::fs::metadata(path).map_err(|e| err(0, None, format!("cannot read: {e}")))?;
    let mut text =
        std::fs::read_to_string(path).map_err(|e| err(0, None, format!("cannot read: {e}")))?;
    let result = parse(path, name, &text, meta.permissions().mode());
    text.zeroize();
    result
}

#[derive(PartialEq)]
enum Section {
    None,
    Interface,
    Peer,
}

/// Parses the text of a wg-quick file named `file` (for messages and for
/// `PrivateKeyFile` paths relative to it); `mode` is the file's permissions.
pub fn parse(
    file: &Path,
    name: IfName,
    text: &str,
    mode: u32,
) -> Result<TunnelConfig, ConfigError> {
    let err = |line, key: &str, msg: String| ConfigError {
        file: file.to_owned(),
        line,
        key: (!key.is_empty()).then(|| key.to_owned()),
        msg,
    };
    let mut section = Section::None;
    let mut private_key: Option<PrivateKey> = None;
    let mut inline_key_line = None;
    let mut inline_psk_line = None;
    let mut listen_port = None;
    let mut addresses = Vec::new();
    let mut mtu = None;
    let mut dev_mode = None;
    let mut mac = None;
    let mut bridge = None;
    let mut transport = Transport::Udp;
    let mut peers: Vec<PeerEntry> = Vec::new();
    let warnings = Vec::new();
    let mut interface_line = None;
    let mut ops = Ops::default();
    let mut user_line = None;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            section = match line.to_ascii_lowercase().as_str() {
                "[interface]" => {
                    if interface_line.is_some() {
                        return Err(err(
                            n,
                            "",
                            "a second [Interface] section: a file describes one interface".into(),
                        ));
                    }
                    interface_line = Some(n);
                    Section::Interface
                }
                "[peer]" => {
                    peers.push(PeerEntry {
                        public_key: PublicKey([0; 32]),
                        psk: None,
                        endpoint: None,
                        allowed_ips: Vec::new(),
                        keepalive: None,
                        rate: None,
                        line: n,
                        endpoint_line: n,
                    });
                    Section::Peer
                }
                other => {
                    return Err(err(
                        n,
                        "",
                        format!("unknown section {other}: use [Interface] or [Peer]"),
                    ));
                }
            };
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            // Not echoed: a mistyped line may hold a private key.
            return Err(err(
                n,
                "",
                "expected KEY = VALUE (the line is not shown: it may hold a key)".into(),
            ));
        };
        let (key, value) = (key.trim(), value.trim());
        // A key with spaces in it, or far longer than any key, is a mistyped
        // line that may hold a secret: not echoed.
        if key.contains(char::is_whitespace) || key.len() > 32 {
            return Err(err(
                n,
                "",
                "expected KEY = VALUE (the line is not shown: it may hold a key)".into(),
            ));
        }
        let lower = key.to_ascii_lowercase();
        let list = || value.split(',').map(str::trim).filter(|s| !s.is_empty());
        match (&section, lower.as_str()) {
            (Section::None, _) => return Err(err(n, key, "outside any section: start with [Interface]".into())),
            (Section::Interface, "privatekey") => {
                private_key = Some(PrivateKey::from_base64(value).map_err(|e| err(n, key, e.to_string()))?);
                inline_key_line = Some(n);
            }
            (Section::Interface, "privatekeyfile") => {
                private_key = Some(read_key_file(file, value).map_err(|m| err(n, key, m))?);
            }
            (Section::Interface, "listenport") => {
                listen_port = Some(value.parse::<u16>().map_err(|_| err(n, key, format!("{value:?} is not a port (0-65535)")))?);
            }
            (Section::Interface, "address") => {
                for a in list() {
                    let net = crate::dev::parse_addr(a).map_err(|m| err(n, key, m))?;
                    if let Some(o) = addresses.iter().find(|o: &&IpNet| o.addr() == net.addr()) {
                        return Err(err(n, key, twice(o, &net)));
                    }
                    addresses.push(net);
                }
            }
            (Section::Interface, "mtu") => {
                let m = value.parse::<u32>().ok().filter(|m| (576..=65535).contains(m));
                mtu = Some(m.ok_or_else(|| err(n, key, format!("{value:?} is not an MTU (576 to 65535)")))?);
            }
            (Section::Interface, "mode") => dev_mode = Some((n, parse_mode(value).map_err(|m| err(n, key, m))?)),
            (Section::Interface, "mac") => mac = Some((n, crate::dev::parse_mac(value).map_err(|m| err(n, key, m))?)),
            (Section::Interface, "bridge") => {
                bridge = Some((n, IfName::new(value).map_err(|e| err(n, key, e.to_string()))?));
            }
            (Section::Interface, "transport") => transport = parse_transport(value).map_err(|m| err(n, key, m))?,
            (Section::Peer, "rate") => {
                peers.last_mut().expect("in a [Peer] section").rate = Some(parse_rate(value).map_err(|m| err(n, key, m))?);
            }
            (Section::Peer, "publickey") => {
                let peer = peers.last_mut().expect("in a [Peer] section");
                peer.public_key = PublicKey::from_base64(value).map_err(|e| err(n, key, e.to_string()))?;
            }
            (Section::Peer, "presharedkey") => {
                let peer = peers.last_mut().expect("in a [Peer] section");
                peer.psk = Some(PresharedKey::from_base64(value).map_err(|e| err(n, key, e.to_string()))?);
                inline_psk_line.get_or_insert(n);
            }
            (Section::Peer, "endpoint") => {
                let (host, port) = value
                    .rsplit_once(':')
                    .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
                    .ok_or_else(|| err(n, key, format!("{value:?} is not HOST:PORT (e.g. vpn.example.org:51820 or [2001:db8::1]:51820)")))?;
                let _ = (host, port);
                let peer = peers.last_mut().expect("in a [Peer] section");
                peer.endpoint = Some(value.to_owned());
                peer.endpoint_line = n;
            }
            (Section::Peer, "allowedips") => {
                for a in list() {
                    let net = a.parse::<IpNet>().or_else(|_| a.parse::<IpAddr>().map(IpNet::from)).map_err(|_| {
                        err(n, key, format!("{a:?} is not an address range (e.g. 10.0.0.2/32 or fd00::/64)"))
                    })?;
                    // As the kernel keeps it: host bits cleared (10.0.0.5/24 is 10.0.0.0/24).
                    peers.last_mut().expect("in a [Peer] section").allowed_ips.push(net.trunc());
                }
            }
            (Section::Peer, "persistentkeepalive") => {
                let k = if value == "off" {
                    0
                } else {
                    value.parse::<u16>().map_err(|_| err(n, key, format!("{value:?} is not a number of seconds (or off)")))?
                };
                // 0 and off kept as given: a reload turns the keepalive off
                // (where a file without the key leaves it as it runs).
                peers.last_mut().expect("in a [Peer] section").keepalive = Some(k);
            }
            (Section::Interface, "table") => ops.table = parse_table(value).map_err(|m| err(n, key, m))?,
            (Section::Interface, "fwmark") => ops.fwmark = parse_fwmark(value).map_err(|m| err(n, key, m))?,
            // Hooks keep the rest of the line, '#' included, as wg-quick does.
            (Section::Interface, "preup") => ops.pre_up.push(hook_value(raw)),
            (Section::Interface, "postup") => ops.post_up.push(hook_value(raw)),
            (Section::Interface, "predown") => ops.pre_down.push(hook_value(raw)),
            (Section::Interface, "postdown") => ops.post_down.push(hook_value(raw)),
            (Section::Interface, "dns") => ops.dns.extend(list().map(str::to_owned)),
            (Section::Interface, "user") => {
                crate::users::uid(value).map_err(|m| err(n, key, m))?;
                ops.user = Some(value.to_owned());
                user_line = Some(n);
            }
            (Section::Interface, "saveconfig") => {
                ops.save_config = match value.to_ascii_lowercase().as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(err(n, key, format!("{value:?} is not true or false"))),
                }
            }
            (Section::Interface, _) => {
                return Err(err(n, key, "not a key of [Interface]; the known keys are PrivateKey, PrivateKeyFile, ListenPort, Address, MTU, DNS, Table, FwMark, PreUp, PostUp, PreDown, PostDown, SaveConfig, Mode, MAC, Bridge, Transport, User".into()))
            }
            (Section::Peer, _) => {
                return Err(err(n, key, "not a key of [Peer]; the known keys are PublicKey, PresharedKey, Endpoint, AllowedIPs, PersistentKeepalive, Rate".into()))
            }
        }
    }
    let Some(interface_line) = interface_line else {
        return Err(err(0, "", "no [Interface] section".into()));
    };
    let private_key = private_key.ok_or_else(|| {
        // wg-quick(8)'s way of keeping the key out of the file: a tunnel
        // here has its key from the start.
        let by_hook = ops
            .post_up
            .iter()
            .chain(&ops.pre_up)
            .any(|h| h.contains("private-key"));
        err(
            interface_line,
            "PrivateKey",
            if by_hook {
                "missing: a tapir tunnel starts with its key, and cannot wait for a hook's `wg set %i private-key ...`: give PrivateKeyFile = PATH (a root-only file: the key stays out of this one), or PrivateKey".into()
            } else {
                "missing: give PrivateKey (from wg genkey or tapir genkey) or PrivateKeyFile".into()
            },
        )
    })?;
    for (line, what, k) in [
        (inline_key_line, "a private key", "PrivateKey"),
        (inline_psk_line, "a preshared key", "PresharedKey"),
    ] {
        if let Some(line) = line.filter(|_| mode & 0o077 != 0) {
            return Err(err(
                line,
                k,
                format!(
                    "this file holds {what} and is readable by group or others (mode {:o}): chmod 600 {}",
                    mode & 0o777,
                    file.display()
                ),
            ));
        }
    }
    let ours = private_key.public_key();
    let mut seen = std::collections::HashSet::new();
    for p in &peers {
        if p.public_key.0 == [0; 32] {
            return Err(err(p.line, "PublicKey", "missing in this [Peer]".into()));
        }
        if p.public_key == ours {
            return Err(err(
                p.line,
                "PublicKey",
                "is this interface's own public key".into(),
            ));
        }
        if !seen.insert(p.public_key) {
            return Err(err(
                p.line,
                "PublicKey",
                "a second [Peer] with the same key".into(),
            ));
        }
    }
    let mode_value = dev_mode.map_or(tapir_sys::Mode::Tun, |(_, m)| m);
    let tap_only = |what: Option<usize>, key: &str| match what {
        Some(line) if mode_value != tapir_sys::Mode::Tap => Err(err(
            line,
            key,
            "only for tap mode: add Mode = tap to [Interface], or remove this line".into(),
        )),
        _ => Ok(()),
    };
    tap_only(mac.as_ref().map(|(l, _)| *l), "MAC")?;
    tap_only(bridge.as_ref().map(|(l, _)| *l), "Bridge")?;
    if let (Some((line, b)), false) = (&bridge, addresses.is_empty()) {
        return Err(err(
            *line,
            "Bridge",
            format!(
                "with Address: an address on a port of a bridge is not reached; put it on the bridge instead (ip addr add ... dev {b}) and remove Address"
            ),
        ));
    }
    if let Some(line) = user_line {
        if let Some(what) = caps_at_down(&ops) {
            return Err(err(
                line,
                "User",
                format!("with {what}: it runs at down and needs root; remove one of them"),
            ));
        }
    }
    Ok(TunnelConfig {
        file: file.to_owned(),
        name,
        private_key,
        listen_port,
        addresses,
        mtu: mtu.unwrap_or(default_mtu(mode_value)),
        mtu_auto: mtu.is_none(),
        mode: mode_value,
        mac: mac.map(|(_, m)| m),
        bridge: bridge.map(|(_, b)| b),
        transport,
        routes: None,
        peers,
        warnings,
        ops,
    })
}

/// What in `ops` needs root's capabilities, not only its uid, at down (so
/// cannot go with `User`): the down hooks and resolvconf run programs that
/// may do whatever root may; SaveConfig writes a file that may be another
/// user's, mode 0600, which takes root's CAP_DAC_OVERRIDE (uid 0 without
/// it failed to save).
pub fn caps_at_down(ops: &Ops) -> Option<&'static str> {
    if !ops.pre_down.is_empty() || !ops.post_down.is_empty() {
        Some("PreDown/PostDown")
    } else if !ops.dns.is_empty() {
        Some("DNS")
    } else if ops.save_config {
        // The file may be another user's, 0600: root's DAC override.
        Some("SaveConfig")
    } else {
        None
    }
}

/// A hook's command: everything after the first '=' of the raw line,
/// comments included (a shell command may hold a '#').
fn hook_value(raw: &str) -> String {
    raw.split_once('=').map_or("", |(_, v)| v).trim().to_owned()
}

/// The default MTU for a mode.
pub fn default_mtu(mode: tapir_sys::Mode) -> u32 {
    match mode {
        tapir_sys::Mode::Tun => DEFAULT_MTU,
        tapir_sys::Mode::Tap => DEFAULT_TAP_MTU,
    }
}

/// Where a config named by its tunnel alone is looked for after the
/// working directory (`tapir up wg0` finds `/etc/tapir/wg0.conf`, as
/// `wg-quick up wg0` finds `/etc/wireguard/wg0.conf`); `TAPIR_CONFIG_DIR`
/// moves it.
pub fn config_dir() -> PathBuf {
    std::env::var_os("TAPIR_CONFIG_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_CONFIG_DIR), PathBuf::from)
}
/// [`config_dir`] unless moved.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/tapir";

/// A config as `run`, `up` and `down` take it: [`resolve_in`] with
/// [`config_dir`].
pub fn resolve_path(path: &Path) -> PathBuf {
    resolve_in(path, &config_dir())
}

/// A config named without its extension (`/etc/tapir/wg0`, as the systemd
/// unit names it): `wg0.conf` if it exists, else `wg0.toml` (appended:
/// `wg.0` is `wg.0.conf`, not `wg.conf`), before a file `wg0` itself,
/// which names no tunnel; any other path as it is. A bare name (no
/// directory) found nowhere here is looked for so in `dir` too.
pub fn resolve_in(path: &Path, dir: &Path) -> PathBuf {
    let here = with_extension(path);
    let bare = matches!(
        path.components().collect::<Vec<_>>()[..],
        [std::path::Component::Normal(_)]
    );
    if bare && !here.exists() {
        let there = with_extension(&dir.join(path));
        if there.exists() {
            return there;
        }
    }
    here
}

fn with_extension(path: &Path) -> PathBuf {
    if path.extension().is_some_and(|e| e == "conf" || e == "toml") {
        return path.to_owned();
    }
    ["conf", "toml"]
        .iter()
        .map(|e| {
            let mut name = path.as_os_str().to_owned();
            name.push(".");
            name.push(e);
            PathBuf::from(name)
        })
        .find(|p| p.exists())
        .unwrap_or_else(|| path.to_owned())
}

/// Whether the config is there at all: an error saying where a name alone
/// was looked for if not.
fn exists(path: &Path) -> Result<(), ConfigError> {
    if path.exists() {
        return Ok(());
    }
    let bare = path.components().count() == 1 && path.extension().is_none();
    let msg = if bare {
        let n = path.display();
        let d = config_dir();
        let d = d.display();
        format!(
            "no such config: a tunnel's name alone is looked for as {n}.conf or {n}.toml here, then in {d} ({d}/{n}.conf, {d}/{n}.toml)"
        )
    } else {
        "no such config file".to_owned()
    };
    Err(ConfigError {
        file: path.to_owned(),
        line: 0,
        key: None,
        msg,
    })
}

/// Reads a config file: TOML (`*.toml`, any number of tunnels) or wg-quick
/// (`NAME.conf`, one tunnel named NAME). Tunnel names must differ.
pub fn load_any(path: &Path) -> Result<Vec<TunnelConfig>, ConfigError> {
    exists(path)?;
    if path.extension().is_some_and(|e| e == "toml") {
        load_toml(path)
    } else {
        load(path).map(|c| vec![c])
    }
}

mod toml_schema {
    use serde::Deserialize;
    use toml::Spanned;

    /// A key as written in the file: wiped when dropped.
    #[derive(Deserialize)]
    #[serde(transparent)]
    pub struct Secret(Spanned<String>);

    impl Drop for Secret {
        fn drop(&mut self) {
            zeroize::Zeroize::zeroize(self.0.get_mut());
        }
    }

    impl std::ops::Deref for Secret {
        type Target = Spanned<String>;
        fn deref(&self) -> &Spanned<String> {
            &self.0
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct File {
        #[serde(rename = "tunnel", default)]
        pub tunnels: Vec<Tunnel>,
        #[serde(rename = "device", default)]
        pub devices: Vec<Spanned<Device>>,
    }

    /// `[[device]]`: a persistent tun/tap device (see `crate::devices`).
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Device {
        pub name: Spanned<String>,
        pub mode: Spanned<String>,
        pub user: Option<String>,
        pub group: Option<String>,
        #[serde(default)]
        pub multi_queue: bool,
        #[serde(default)]
        pub vnet_hdr: bool,
        #[serde(default)]
        pub pi: bool,
        pub mtu: Option<Spanned<u32>>,
        #[serde(default)]
        pub addresses: Vec<Spanned<String>>,
        #[serde(default)]
        pub routes: Vec<Spanned<String>>,
        pub up: Option<bool>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Tunnel {
        pub name: Spanned<String>,
        pub private_key: Option<Secret>,
        pub private_key_file: Option<Spanned<String>>,
        pub listen_port: Option<u16>,
        #[serde(default)]
        pub addresses: Vec<Spanned<String>>,
        pub mtu: Option<Spanned<u32>>,
        pub mode: Option<Spanned<String>>,
        pub mac: Option<Spanned<String>>,
        pub bridge: Option<Spanned<String>>,
        pub transport: Option<Spanned<String>>,
        pub routes: Option<Vec<Spanned<String>>>,
        pub table: Option<Spanned<TableValue>>,
        pub fwmark: Option<Spanned<u32>>,
        #[serde(default)]
        pub pre_up: Vec<String>,
        #[serde(default)]
        pub post_up: Vec<String>,
        #[serde(default)]
        pub pre_down: Vec<String>,
        #[serde(default)]
        pub post_down: Vec<String>,
        #[serde(default)]
        pub dns: Vec<String>,
        pub user: Option<Spanned<String>>,
        #[serde(rename = "peer", default)]
        pub peers: Vec<Spanned<Peer>>,
    }

    /// `table = "auto"`, `"off"`, `"main"` or a number.
    #[derive(Deserialize)]
    #[serde(untagged)]
    pub enum TableValue {
        Number(u32),
        Name(String),
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Peer {
        pub public_key: Spanned<String>,
        pub preshared_key: Option<Secret>,
        pub endpoint: Option<Spanned<String>>,
        #[serde(default)]
        pub allowed_ips: Vec<Spanned<String>>,
        pub persistent_keepalive: Option<u16>,
        pub rate: Option<Spanned<String>>,
    }
}

/// Reads tapir's TOML:
///
/// ```toml
/// [[tunnel]]
/// name = "tp0"
/// private_key_file = "/etc/tapir/tp0.key"   # mode 600, or private_key = "..."
/// listen_port = 51820
/// addresses = ["10.77.0.1/24"]
/// mtu = 1420                                # optional: the path's less 80 (94 in tap mode), as wg-quick
/// mode = "tun"                              # or "tap": Ethernet frames, a learning switch
/// mac = "02:00:00:00:00:01"                 # tap mode, optional: made from the key and name if absent
/// bridge = "br0"                            # tap mode, optional: the tap joins this bridge
/// transport = "udp"                         # or "tcp": udp2tcp's framing
/// routes = ["10.1.0.0/16"]                  # optional: default, the peers' allowed IPs
/// table = "auto"                            # or "off", "main", a number (wg-quick's Table)
/// fwmark = 51820                            # optional (wg-quick's FwMark)
/// dns = ["10.77.0.1", "example.internal"]   # optional: through resolvconf
/// pre_up = ["..."]                          # optional: shell commands, %i is the name;
/// post_up = ["..."]                         #   also pre_down, post_down
///
/// [[tunnel.peer]]
/// public_key = "..."
/// preshared_key = "..."                     # optional
/// endpoint = "192.0.2.2:51820"              # optional
/// allowed_ips = ["10.77.0.2/32"]
/// persistent_keepalive = 25                 # optional
/// rate = "20mbit"                           # optional: each direction
/// ```
pub fn load_toml(path: &Path) -> Result<Vec<TunnelConfig>, ConfigError> {
    let whole = |msg: String| ConfigError {
        file: path.to_owned(),
        line: 0,
        key: None,
        msg,
    };
    let meta = std::fs::metadata(path).map_err(|e| whole(format!("cannot read: {e}")))?;
    let mut text = std::fs::read_to_string(path).map_err(|e| whole(format!("cannot read: {e}")))?;
    let result = parse_toml(path, &text, meta.permissions().mode());
    text.zeroize();
    result
}

/// Parses the text of a TOML config (see [`load_toml`]): its tunnels,
/// at least one.
pub fn parse_toml(path: &Path, text: &str, mode: u32) -> Result<Vec<TunnelConfig>, ConfigError> {
    let (tunnels, devices) = parse_toml_all(path, text, mode)?;
    if tunnels.is_empty() {
        return Err(ConfigError {
            file: path.to_owned(),
            line: 0,
            key: None,
            msg: if devices.is_empty() {
                "no [[tunnel]]: nothing to run".into()
            } else {
                "no [[tunnel]] to run: its [[device]] tables are applied by tapir up".into()
            },
        });
    }
    Ok(tunnels)
}

/// What a file declares: its tunnels and its `[[device]]` tables (wg-quick
/// files have no devices).
pub fn load_file(
    path: &Path,
) -> Result<(Vec<TunnelConfig>, Vec<crate::devices::DeviceConfig>), ConfigError> {
    exists(path)?;
    if path.extension().is_some_and(|e| e == "toml") {
        let whole = |msg: String| ConfigError {
            file: path.to_owned(),
            line: 0,
            key: None,
            msg,
        };
        let meta = std::fs::metadata(path).map_err(|e| whole(format!("cannot read: {e}")))?;
        let mut text =
            std::fs::read_to_string(path).map_err(|e| whole(format!("cannot read: {e}")))?;
        let result = parse_toml_all(path, &text, meta.permissions().mode());
        text.zeroize();
        let (t, d) = result?;
        if t.is_empty() && d.is_empty() {
            return Err(whole(
                "no [[tunnel]] and no [[device]]: nothing to do".into(),
            ));
        }
        Ok((t, d))
    } else {
        load(path).map(|c| (vec![c], Vec::new()))
    }
}

/// [`parse_toml`], devices too, and no tunnel needed.
#[allow(clippy::type_complexity)]
pub fn parse_toml_all(
    path: &Path,
    text: &str,
    mode: u32,
) -> Result<(Vec<TunnelConfig>, Vec<crate::devices::DeviceConfig>), ConfigError> {
    // Where each line starts, found once: a file with 10,000 peers would
    // otherwise be scanned from the top for each of them.
    let line_starts: Vec<usize> = std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .collect();
    let line_of = |span: std::ops::Range<usize>| {
        line_starts.partition_point(|&start| start <= span.start.min(text.len()))
    };
    let err = |span: std::ops::Range<usize>, key: &str, msg: String| ConfigError {
        file: path.to_owned(),
        line: line_of(span),
        key: Some(key.to_owned()),
        msg,
    };
    let file: toml_schema::File = toml::from_str(text).map_err(|e| {
        // The key of the line at fault (`listen_port = 70000`), or its
        // table's header (`[tunnel]`), and a word on the usual slips.
        let line = e.span().map_or(0, line_of);
        let at = line
            .checked_sub(1)
            .and_then(|l| text.lines().nth(l))
            .unwrap_or("")
            .trim();
        let key = at
            .split_once('=')
            .map(|(k, _)| k.trim().to_owned())
            .filter(|k| !k.is_empty() && !k.starts_with('['));
        let message = e.message().trim_end();
        let hint = if (at == "[tunnel]" || at == "[device]") && message.contains("expected a sequence") {
            format!("; write [{at}] with two brackets: each is one table of a list ([[tunnel]] or [[device]])")
        } else {
            // Each number key's range, in words (serde's say the type).
            match key.as_deref() {
                Some("listen_port") => "; a port is 1 to 65535".to_owned(),
                Some("persistent_keepalive") => {
                    "; seconds between keepalives, 1 to 65535 (0 or none: off)".to_owned()
                }
                Some("mtu") => "; an MTU, 68 to 65535".to_owned(),
                Some("fwmark") | Some("table") => "; a number, 1 to 4294967295".to_owned(),
                _ if message.contains("expected u16") => "; a number, 0 to 65535".to_owned(),
                _ => String::new(),
            }
        };
        ConfigError {
            file: path.to_owned(),
            line,
            key,
            msg: format!("{message}{hint}"),
        }
    })?;
    let mut devices: Vec<crate::devices::DeviceConfig> = Vec::new();
    for d in &file.devices {
        let d = d.get_ref();
        let name =
            IfName::new(d.name.get_ref()).map_err(|e| err(d.name.span(), "name", e.to_string()))?;
        if name.is_template() {
            return Err(err(
                d.name.span(),
                "name",
                "a declared device needs a fixed name, without '%'".into(),
            ));
        }
        if devices.iter().any(|o| o.name == name)
            || file
                .tunnels
                .iter()
                .any(|t| t.name.get_ref() == name.as_str())
        {
            return Err(err(
                d.name.span(),
                "name",
                format!("a second device or tunnel named {name}"),
            ));
        }
        let mode = parse_mode(d.mode.get_ref()).map_err(|e| err(d.mode.span(), "mode", e))?;
        let mtu = match &d.mtu {
            Some(m) if !(68..=65535).contains(m.get_ref()) => {
                return Err(err(
                    m.span(),
                    "mtu",
                    format!("{} is not an MTU (68 to 65535)", m.get_ref()),
                ));
            }
            m => m.as_ref().map(|m| *m.get_ref()),
        };
        if let Some(m) = &d.mtu {
            if mode == tapir_sys::Mode::Tap && *m.get_ref() > crate::dev::TAP_MAX_MTU {
                return Err(err(
                    m.span(),
                    "mtu",
                    format!(
                        "{} is too large for a tap: at most {} (65535 less its Ethernet header)",
                        m.get_ref(),
                        crate::dev::TAP_MAX_MTU
                    ),
                ));
            }
        }
        let mut addresses: Vec<IpNet> = Vec::new();
        for a in &d.addresses {
            let net =
                crate::dev::parse_addr(a.get_ref()).map_err(|m| err(a.span(), "addresses", m))?;
            if let Some(o) = addresses.iter().find(|o| o.addr() == net.addr()) {
                return Err(err(a.span(), "addresses", twice(o, &net)));
            }
            if net.addr().is_ipv6() && mtu.is_some_and(|m| m < 1280) {
                return Err(err(
                    a.span(),
                    "addresses",
                    format!(
                        "{net} is IPv6, which needs an MTU of 1280 or more (mtu = {})",
                        mtu.unwrap_or(0)
                    ),
                ));
            }
            addresses.push(net);
        }
        let mut routes = Vec::new();
        for r in &d.routes {
            routes.push(
                crate::dev::parse_route(r.get_ref(), false)
                    .map_err(|m| err(r.span(), "routes", m))?,
            );
        }
        if let (Some(false), Some(r)) = (d.up, d.routes.first()) {
            // (It was the kernel's "Network is down" at up, the file unnamed.)
            return Err(err(
                r.span(),
                "routes",
                "a device that stays down (up = false) can have no routes: the kernel refuses them; set up = true, or remove routes".into(),
            ));
        }
        devices.push(crate::devices::DeviceConfig {
            name,
            mode,
            user: d.user.clone(),
            group: d.group.clone(),
            multi_queue: d.multi_queue,
            vnet_hdr: d.vnet_hdr,
            pi: d.pi,
            mtu,
            addresses,
            routes,
            up: d.up.unwrap_or(true),
        });
    }
    let mut out: Vec<TunnelConfig> = Vec::new();
    for t in file.tunnels {
        let name_span = t.name.span();
        let name = IfName::new(t.name.get_ref())
            .map_err(|e| err(name_span.clone(), "name", e.to_string()))?;
        if name.is_template() {
            return Err(err(
                name_span,
                "name",
                "a tunnel needs a fixed name, without '%'".into(),
            ));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(err(
                name_span,
                "name",
                format!("a second tunnel named {name}"),
            ));
        }
        let warnings = Vec::new();
        let private_key = match (&t.private_key, &t.private_key_file) {
            (Some(k), None) => {
                if mode & 0o077 != 0 {
                    return Err(err(
                        k.span(),
                        "private_key",
                        format!(
                            "this file holds a private key and is readable by group or others (mode {:o}): chmod 600 {}",
                            mode & 0o777,
                            path.display()
                        ),
                    ));
                }
                PrivateKey::from_base64(k.get_ref())
                    .map_err(|e| err(k.span(), "private_key", e.to_string()))?
            }
            (None, Some(f)) => read_key_file(path, f.get_ref())
                .map_err(|m| err(f.span(), "private_key_file", m))?,
            (Some(k), Some(_)) => {
                return Err(err(
                    k.span(),
                    "private_key",
                    "give private_key or private_key_file, not both".into(),
                ));
            }
            (None, None) => {
                return Err(err(
                    name_span,
                    "private_key",
                    "missing: give private_key_file (or private_key)".into(),
                ));
            }
        };
        let mut addresses: Vec<IpNet> = Vec::new();
        for a in &t.addresses {
            let net =
                crate::dev::parse_addr(a.get_ref()).map_err(|m| err(a.span(), "addresses", m))?;
            if let Some(o) = addresses.iter().find(|o| o.addr() == net.addr()) {
                return Err(err(a.span(), "addresses", twice(o, &net)));
            }
            addresses.push(net);
        }
        let dev_mode = match &t.mode {
            Some(m) => parse_mode(m.get_ref()).map_err(|e| err(m.span(), "mode", e))?,
            None => tapir_sys::Mode::Tun,
        };
        let tap_only = |span: std::ops::Range<usize>, key: &str| {
            if dev_mode == tapir_sys::Mode::Tap {
                Ok(())
            } else {
                Err(err(
                    span,
                    key,
                    "only for tap mode: add mode = \"tap\" to this tunnel, or remove it".into(),
                ))
            }
        };
        let mac = match &t.mac {
            Some(m) => {
                tap_only(m.span(), "mac")?;
                Some(crate::dev::parse_mac(m.get_ref()).map_err(|e| err(m.span(), "mac", e))?)
            }
            None => None,
        };
        let bridge = match &t.bridge {
            Some(b) => {
                tap_only(b.span(), "bridge")?;
                if !t.addresses.is_empty() {
                    return Err(err(
                        b.span(),
                        "bridge",
                        format!(
                            "with addresses: an address on a port of a bridge is not reached; put it on the bridge instead (ip addr add ... dev {}) and remove addresses",
                            b.get_ref()
                        ),
                    ));
                }
                Some(IfName::new(b.get_ref()).map_err(|e| err(b.span(), "bridge", e.to_string()))?)
            }
            None => None,
        };
        let transport = match &t.transport {
            Some(x) => parse_transport(x.get_ref()).map_err(|e| err(x.span(), "transport", e))?,
            None => Transport::Udp,
        };
        let mtu = match &t.mtu {
            Some(m) if !(576..=65535).contains(m.get_ref()) => {
                return Err(err(
                    m.span(),
                    "mtu",
                    format!("{} is not an MTU (576 to 65535)", m.get_ref()),
                ));
            }
            Some(m) => *m.get_ref(),
            None => default_mtu(dev_mode),
        };
        let routes = match &t.routes {
            Some(list) => {
                let mut v = Vec::new();
                for r in list {
                    v.push(
                        crate::dev::parse_route(r.get_ref(), false)
                            .map_err(|m| err(r.span(), "routes", m))?,
                    );
                }
                Some(v)
            }
            None => None,
        };
        let ours = private_key.public_key();
        let mut peers: Vec<PeerEntry> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for p in &t.peers {
            let line = line_of(p.span());
            let p = p.get_ref();
            let public_key = PublicKey::from_base64(p.public_key.get_ref())
                .map_err(|e| err(p.public_key.span(), "public_key", e.to_string()))?;
            if public_key == ours {
                return Err(err(
                    p.public_key.span(),
                    "public_key",
                    "is this tunnel's own public key".into(),
                ));
            }
            if !seen.insert(public_key) {
                return Err(err(
                    p.public_key.span(),
                    "public_key",
                    "a second peer with the same key".into(),
                ));
            }
            let psk = match &p.preshared_key {
                Some(k) if mode & 0o077 != 0 => {
                    return Err(err(
                        k.span(),
                        "preshared_key",
                        format!(
                            "this file holds a preshared key and is readable by group or others (mode {:o}): chmod 600 {}",
                            mode & 0o777,
                            path.display()
                        ),
                    ));
                }
                Some(k) => Some(
                    PresharedKey::from_base64(k.get_ref())
                        .map_err(|e| err(k.span(), "preshared_key", e.to_string()))?,
                ),
                None => None,
            };
            if let Some(e) = &p.endpoint {
                let v = e.get_ref();
                if v.rsplit_once(':')
                    .is_none_or(|(h, port)| h.is_empty() || port.parse::<u16>().is_err())
                {
                    return Err(err(e.span(), "endpoint", format!("{v:?} is not HOST:PORT")));
                }
            }
            let mut allowed_ips = Vec::new();
            for a in &p.allowed_ips {
                let v = a.get_ref();
                let net = v
                    .parse::<IpNet>()
                    .or_else(|_| v.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        err(
                            a.span(),
                            "allowed_ips",
                            format!("{v:?} is not an address range (e.g. 10.0.0.2/32)"),
                        )
                    })?;
                allowed_ips.push(net.trunc());
            }
            let rate = match &p.rate {
                Some(r) => Some(parse_rate(r.get_ref()).map_err(|e| err(r.span(), "rate", e))?),
                None => None,
            };
            peers.push(PeerEntry {
                public_key,
                psk,
                endpoint: p.endpoint.as_ref().map(|e| e.get_ref().clone()),
                allowed_ips,
                keepalive: p.persistent_keepalive,
                rate,
                line,
                endpoint_line: p.endpoint.as_ref().map_or(line, |e| line_of(e.span())),
            });
        }
        out.push(TunnelConfig {
            file: path.to_owned(),
            name,
            private_key,
            listen_port: t.listen_port,
            addresses,
            mtu,
            mtu_auto: t.mtu.is_none(),
            mode: dev_mode,
            mac,
            bridge,
            transport,
            routes,
            peers,
            warnings,
            ops: Ops {
                table: match &t.table {
                    Some(v) => match v.get_ref() {
                        toml_schema::TableValue::Number(n) => parse_table(&n.to_string()),
                        toml_schema::TableValue::Name(n) => parse_table(n),
                    }
                    .map_err(|m| err(v.span(), "table", m))?,
                    None => Table::Auto,
                },
                fwmark: t.fwmark.as_ref().map(|m| *m.get_ref()).filter(|m| *m != 0),
                pre_up: t.pre_up.clone(),
                post_up: t.post_up.clone(),
                pre_down: t.pre_down.clone(),
                post_down: t.post_down.clone(),
                dns: t.dns.clone(),
                save_config: false,
                user: match &t.user {
                    Some(u) => {
                        crate::users::uid(u.get_ref()).map_err(|m| err(u.span(), "user", m))?;
                        if !t.pre_down.is_empty() || !t.post_down.is_empty() || !t.dns.is_empty() {
                            return Err(err(
                                u.span(),
                                "user",
                                "with pre_down/post_down or dns: they run at down and need root; remove one of them".into(),
                            ));
                        }
                        Some(u.get_ref().clone())
                    }
                    None => None,
                },
            },
        });
    }
    let mut ports: Vec<u16> = out
        .iter()
        .filter_map(|t| t.listen_port)
        .filter(|p| *p != 0)
        .collect();
    ports.sort_unstable();
    if let Some(w) = ports.windows(2).find(|w| w[0] == w[1]) {
        return Err(ConfigError {
            file: path.to_owned(),
            line: 0,
            key: Some("listen_port".into()),
            msg: format!("two tunnels listen on port {}", w[0]),
        });
    }
    Ok((out, devices))
}

/// Reads a private key from a file that only its owner may read. What is
/// checked is the file opened, the one read: a file swapped in after a
/// check of its name is not read.
pub fn read_key_file(config: &Path, value: &str) -> Result<PrivateKey, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let path = Path::new(value);
    let path = if path.is_relative() {
        config.parent().unwrap_or(Path::new(".")).join(path)
    } else {
        path.to_owned()
    };
    let cannot = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    // Not blocked by a FIFO put there: refused below as not a file.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .map_err(cannot)?;
    let meta = file.metadata().map_err(cannot)?;
    if !meta.is_file() {
        return Err(format!("{} is not a file", path.display()));
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} is readable by group or others (mode {:o}): chmod 600 {0} first",
            path.display(),
            mode & 0o777
        ));
    }
    // Room for all of it at once (a key is 44 characters; past 4 KiB it is
    // not one): a string that grew would leave pieces of the key behind.
    let mut text = String::with_capacity(4097);
    file.take(4096).read_to_string(&mut text).map_err(cannot)?;
    let key = PrivateKey::from_base64(&text).map_err(|e| format!("{}: {e}", path.display()));
    text.zeroize();
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const B: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
    /// A public key other than A's (which is B).
    const C: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    fn p(text: &str) -> Result<TunnelConfig, ConfigError> {
        parse(
            Path::new("/etc/tapir/tp0.conf"),
            IfName::new("tp0").unwrap(),
            text,
            0o600,
        )
    }

    #[test]
    fn reads_a_wg_quick_file() {
        // The shape of wg-quick(8)'s example, with our own keys.
        let c = p(&format!(
            "[Interface]\n# comment\nAddress = 10.200.100.8/24, fd42::8/64\nListenPort = 51820\nPrivateKey = {A}\nMTU = 1380\nDNS = 10.200.100.1\n\n\
             [Peer]\nPublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\nPresharedKey = {B}\nAllowedIPs = 10.200.100.0/24, fd42::/64 # inline\n\
             Endpoint = demo.wireguard.com:51820\nPersistentKeepalive = 25\n"
        ))
        .unwrap();
        assert_eq!(c.name.as_str(), "tp0");
        assert_eq!(c.listen_port, Some(51820));
        assert_eq!(c.mtu, 1380);
        assert_eq!(c.addresses.len(), 2);
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.peers[0].allowed_ips.len(), 2);
        assert_eq!(c.peers[0].keepalive, Some(25));
        assert_eq!(
            c.peers[0].endpoint.as_deref(),
            Some("demo.wireguard.com:51820")
        );
        // Where a message about the endpoint points: its own line.
        assert_eq!((c.peers[0].line, c.peers[0].endpoint_line), (9, 13));
        assert!(!c.mtu_auto);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert_eq!(c.ops.dns, ["10.200.100.1"]);
    }

    #[test]
    fn a_config_named_without_its_extension_is_found() {
        let dir = std::env::temp_dir().join(format!("tapir-resolve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.toml"), "").unwrap();
        std::fs::write(dir.join("b.conf"), "").unwrap();
        std::fs::write(dir.join("b.toml"), "").unwrap();
        assert_eq!(resolve_path(&dir.join("a")), dir.join("a.toml"));
        assert_eq!(
            resolve_path(&dir.join("b")),
            dir.join("b.conf"),
            ".conf first"
        );
        assert_eq!(
            resolve_path(&dir.join("c")),
            dir.join("c"),
            "missing: as given"
        );
        // A dotted name (it looked for wg.conf), and a file of the bare
        // name beside NAME.conf (it was taken, and refused).
        std::fs::write(dir.join("wg.0.conf"), "").unwrap();
        std::fs::write(dir.join("d"), "").unwrap();
        std::fs::write(dir.join("d.conf"), "").unwrap();
        assert_eq!(resolve_path(&dir.join("wg.0")), dir.join("wg.0.conf"));
        assert_eq!(resolve_path(&dir.join("d")), dir.join("d.conf"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_tunnels_name_alone_is_looked_for_in_the_config_directory_after_here() {
        let base = std::env::temp_dir().join(format!("tapir-resolve-dir-{}", std::process::id()));
        let etc = base.join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("wgx9.conf"), "").unwrap();
        std::fs::write(etc.join("lab.toml"), "").unwrap();
        // (The working directory holds none of these.)
        assert_eq!(resolve_in(Path::new("wgx9"), &etc), etc.join("wgx9.conf"));
        assert_eq!(
            resolve_in(Path::new("wgx9.conf"), &etc),
            etc.join("wgx9.conf")
        );
        assert_eq!(resolve_in(Path::new("lab"), &etc), etc.join("lab.toml"));
        // A path with a directory is that path; one found nowhere is as given.
        assert_eq!(resolve_in(Path::new("./wgx9"), &etc), Path::new("./wgx9"));
        assert_eq!(resolve_in(Path::new("nope9"), &etc), Path::new("nope9"));
        // Here before there.
        let here = base.join("here");
        std::fs::create_dir_all(&here).unwrap();
        std::fs::write(here.join("wgx9.conf"), "").unwrap();
        assert_eq!(resolve_in(&here.join("wgx9"), &etc), here.join("wgx9.conf"));
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_missing_config_says_where_it_was_looked_for() {
        let e = load_any(Path::new("nope9")).unwrap_err().to_string();
        assert!(
            e.contains("no such config") && e.contains("nope9.conf") && e.contains("/nope9.toml"),
            "{e}"
        );
        let e = load_any(Path::new("/nonexistent/x.conf"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such config file"), "{e}");
    }

    #[test]
    fn reads_wg_quicks_routing_hooks_and_dns() {
        let c = p(&format!(
            "[Interface]\nPrivateKey = {A}\nTable = 1234\nFwMark = 0xca6c\nDNS = 10.0.0.1, fd00::1, corp.example\nDNS = 10.0.0.2\n\
             PreUp = echo pre %i # stays\nPostUp = iptables -A FORWARD -i %i -j ACCEPT; echo two\nPostUp = echo three\n\
             PreDown = echo pd\nPostDown = echo gone\nSaveConfig = true\n"
        ))
        .unwrap();
        assert_eq!(c.ops.table, Table::Id(1234));
        assert_eq!(c.ops.fwmark, Some(0xca6c));
        assert_eq!(
            c.ops.dns,
            ["10.0.0.1", "fd00::1", "corp.example", "10.0.0.2"]
        );
        assert_eq!(c.ops.pre_up, ["echo pre %i # stays"]);
        assert_eq!(
            c.ops.post_up,
            [
                "iptables -A FORWARD -i %i -j ACCEPT; echo two",
                "echo three"
            ]
        );
        assert_eq!((c.ops.pre_down.len(), c.ops.post_down.len()), (1, 1));
        assert!(c.ops.save_config);
        for (text, want) in [
            ("Table = off", Table::Off),
            ("Table = auto", Table::Auto),
            ("Table = main", Table::Id(254)),
        ] {
            assert_eq!(
                p(&format!("[Interface]\nPrivateKey = {A}\n{text}\n"))
                    .unwrap()
                    .ops
                    .table,
                want
            );
        }
        assert_eq!(
            p(&format!("[Interface]\nPrivateKey = {A}\nUser = 65534\n"))
                .unwrap()
                .ops
                .user
                .as_deref(),
            Some("65534")
        );
        for (text, want) in [
            (
                "User = 65534\nDNS = 10.0.0.1",
                "User: with DNS: it runs at down and needs root",
            ),
            ("User = 65534\nPostDown = true", "with PreDown/PostDown"),
            ("User = no-such-user-here", "no user named"),
            ("Table = local", "is not a routing table"),
            ("FwMark = blue", "is not a firewall mark"),
            ("SaveConfig = yes", "is not true or false"),
        ] {
            let e = p(&format!("[Interface]\nPrivateKey = {A}\n{text}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn reads_tapir_extensions() {
        let c = p(&format!(
            "[Interface]\nPrivateKey = {A}\nMode = tap\nMAC = 02:00:00:aa:bb:cc\nBridge = br0\nTransport = tcp\n\n\
             [Peer]\nPublicKey = {C}\nRate = 20mbit\n"
        ))
        .unwrap();
        assert_eq!(c.mode, tapir_sys::Mode::Tap);
        assert_eq!(c.mac, Some([2, 0, 0, 0xaa, 0xbb, 0xcc]));
        assert_eq!(c.bridge.as_ref().map(IfName::as_str), Some("br0"));
        assert_eq!(c.transport, Transport::Tcp);
        assert_eq!(c.mtu, DEFAULT_TAP_MTU);
        assert_eq!(c.peers[0].rate, Some(20_000_000));
        let e = p(&format!("[Interface]\nPrivateKey = {A}\nBridge = br0\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(":3: Bridge: only for tap mode"), "{e}");
        let e = p(&format!(
            "[Interface]\nPrivateKey = {A}\nMode = tap\nBridge = br0\nAddress = 10.0.0.1/24\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(":4: Bridge: with Address") && e.contains("dev br0"),
            "{e}"
        );
        let e = p(&format!("[Interface]\nPrivateKey = {A}\nMode = tup\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":3: Mode: \"tup\" is not a mode: use tun"),
            "{e}"
        );
        let e = p(&format!(
            "[Interface]\nPrivateKey = {A}\nMode = tap\nMAC = ff:ff:ff:ff:ff:ff\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(":4: MAC: ff:ff:ff:ff:ff:ff is a multicast address"),
            "{e}"
        );
        let t = parse_toml(
            Path::new("t.toml"),
            &format!(
                "[[tunnel]]\nname = \"tp0\"\nprivate_key = \"{A}\"\nmode = \"tap\"\ntransport = \"tcp\"\n\
                 [[tunnel.peer]]\npublic_key = \"{C}\"\nrate = \"512kbit\"\n"
            ),
            0o600,
        )
        .unwrap();
        assert_eq!(
            (t[0].mode, t[0].transport),
            (tapir_sys::Mode::Tap, Transport::Tcp)
        );
        assert_eq!(t[0].peers[0].rate, Some(512_000));
        let e = parse_toml(
            Path::new("t.toml"),
            &format!("[[tunnel]]\nname = \"tp0\"\nprivate_key = \"{A}\"\ntransport = \"sctp\"\n"),
            0o600,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("t.toml:4: transport: \"sctp\" is not a transport"),
            "{e}"
        );
    }

    #[test]
    fn rates_read_as_tc_writes_them() {
        assert_eq!(parse_rate("20mbit"), Ok(20_000_000));
        assert_eq!(parse_rate("1.5Gbit"), Ok(1_500_000_000));
        assert_eq!(parse_rate("64000"), Ok(64_000));
        assert!(
            parse_rate("20 furlongs")
                .unwrap_err()
                .contains("not a rate")
        );
        assert!(parse_rate("1bit").unwrap_err().contains("out of range"));
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let cases = [
            (
                "[Interface]\nPrivateKey = nope\n",
                "/etc/tapir/tp0.conf:2: PrivateKey: not a WireGuard key",
            ),
            (
                "[Interface]\nPrivateKey = KEY\nListenPort = 70000\n",
                ":3: ListenPort: \"70000\" is not a port",
            ),
            (
                "[Interface]\nPrivateKey = KEY\nColor = blue\n",
                ":3: Color: not a key of [Interface]; the known keys are PrivateKey",
            ),
            (
                "[Interface]\nPrivateKey = KEY\n[Peer]\nAllowedIPs = 10.0.0.0/8\n",
                ":3: PublicKey: missing in this [Peer]",
            ),
            (
                "[Interface]\nPrivateKey = KEY\n[Peer]\nPublicKey = PEER\nEndpoint = nowhere\n",
                ":5: Endpoint: \"nowhere\" is not HOST:PORT",
            ),
            (
                "[Interface]\nPrivateKey = KEY\n[Peer]\nPublicKey = PEER\nAllowedIPs = 10.0.0.300/32\n",
                ":5: AllowedIPs:",
            ),
            (
                "Address = 10.0.0.1/24\n",
                ":1: Address: outside any section",
            ),
            (
                "[Interface]\nAddress = 10.0.0.1/24\n",
                ":1: PrivateKey: missing",
            ),
            (
                "[Interface]\nPostUp = wg set %i private-key <(pass wg0)\n",
                ":1: PrivateKey: missing: a tapir tunnel starts with its key, and cannot wait for a hook's",
            ),
            (
                "[Interface]\nPrivateKey = KEY\nAddress = 10.1.1.1/24, fd00::1/64, 10.1.1.1/24\n",
                ":3: Address: 10.1.1.1 is given twice (10.1.1.1/24 and 10.1.1.1/24)",
            ),
            ("[Interfaces]\n", ":1: unknown section [interfaces]"),
            (
                "[Interface]\nPrivateKey = KEY\n[Peer]\nPublicKey = OWN\n",
                ":3: PublicKey: is this interface's own public key",
            ),
            (
                "[Interface]\nPrivateKey = KEY\n[Peer]\nPublicKey = 4Ot6fDtBuK4WVuP68Z/EatoJjeucMrH9hmIFFl9JuAA=\n",
                ":4: PublicKey: a key of small order",
            ),
        ];
        let own = PrivateKey::from_base64(A).unwrap().public_key().to_base64();
        for (text, want) in cases {
            let text = text
                .replace("KEY", A)
                .replace("PEER", B)
                .replace("OWN", &own);
            let e = p(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn reads_toml_with_several_tunnels() {
        let text = format!(
            "[[tunnel]]\nname = \"tp0\"\nprivate_key = \"{A}\"\nlisten_port = 51820\naddresses = [\"10.77.0.1/24\"]\n\n\
             [[tunnel.peer]]\npublic_key = \"{C}\"\nendpoint = \"192.0.2.2:51820\"\nallowed_ips = [\"10.77.0.2/32\"]\npersistent_keepalive = 25\n\n\
             [[tunnel]]\nname = \"tp1\"\nprivate_key = \"{B}\"\nlisten_port = 51821\nroutes = [\"10.9.0.0/16\"]\nmtu = 1380\n"
        );
        let t = parse_toml(Path::new("t.toml"), &text, 0o600).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].name.as_str(), "tp0");
        assert_eq!(t[0].peers[0].keepalive, Some(25));
        assert_eq!(t[0].peers[0].line, 7, "the line of its first key");
        assert_eq!(t[0].mtu, DEFAULT_MTU);
        assert!(t[0].routes.is_none());
        assert_eq!(t[1].routes.as_ref().unwrap()[0].to_string(), "10.9.0.0/16");
        assert_eq!(t[1].mtu, 1380);
    }

    #[test]
    fn a_device_that_stays_down_takes_no_routes() {
        let text = "[[device]]\nname = \"qvm1\"\nmode = \"tun\"\naddresses = [\"10.97.0.1/30\"]\nroutes = [\"10.97.8.0/24\"]\nup = false\n";
        let e = parse_toml_all(Path::new("d.toml"), text, 0o600)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("d.toml:5: routes: a device that stays down"),
            "{e}"
        );
        let up = text.replace("up = false", "up = true");
        assert!(parse_toml_all(Path::new("d.toml"), &up, 0o600).is_ok());
    }

    #[test]
    fn only_name_dot_conf_names_a_tunnel() {
        let dir = std::env::temp_dir().join(format!("tapir-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = format!("[Interface]\nPrivateKey = {A}\n");
        for f in ["qh2.txt", ".conf", "wg0"] {
            let p = dir.join(f);
            std::fs::write(&p, &text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            let e = load_any(&p).unwrap_err().to_string();
            assert!(e.contains("call it NAME.conf"), "{f}: {e}");
        }
        let p = dir.join("wg.0.conf");
        std::fs::write(&p, &text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_any(&p).unwrap()[0].name.as_str(), "wg.0");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn toml_errors_name_file_line_and_key() {
        let base = format!("[[tunnel]]\nname = \"tp0\"\nprivate_key = \"{A}\"\n");
        let cases = [
            (
                format!("{base}listen_port = 99999\n"),
                "t.toml:4: listen_port: invalid value: integer `99999`, expected u16; a port is 1 to 65535",
            ),
            (
                format!("[tunnel]\nname = \"tp0\"\nprivate_key = \"{A}\"\n"),
                "with two brackets: each is one table of a list",
            ),
            // Not "a port" for a keepalive (it said so).
            (
                format!(
                    "{base}[[tunnel.peer]]\npublic_key = \"{C}\"\npersistent_keepalive = 70000\n"
                ),
                "persistent_keepalive: invalid value: integer `70000`, expected u16; seconds between keepalives",
            ),
            (
                format!("{base}colour = \"red\"\n"),
                "t.toml:4: colour: unknown field `colour`",
            ),
            (
                format!("{base}addresses = [\"10.0.0.1/40\"]\n"),
                "t.toml:4: addresses: ",
            ),
            (
                format!("{base}addresses = [\"10.1.2.1/24\", \"10.1.2.1/24\"]\n"),
                "t.toml:4: addresses: 10.1.2.1 is given twice",
            ),
            (
                format!("{base}[[tunnel.peer]]\npublic_key = \"x\"\n"),
                "t.toml:5: public_key: not a WireGuard key",
            ),
            (
                format!("{base}[[tunnel.peer]]\npublic_key = \"{C}\"\nallowed_ips = [\"nope\"]\n"),
                "t.toml:6: allowed_ips:",
            ),
            (
                format!("{base}[[tunnel.peer]]\npublic_key = \"{B}\"\n"),
                "t.toml:5: public_key: is this tunnel's own public key",
            ),
            (
                format!(
                    "{base}[[tunnel.peer]]\npublic_key = \"AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"\n"
                ),
                "t.toml:5: public_key: a key of small order",
            ),
            (
                format!("{base}[[tunnel]]\nname = \"tp0\"\nprivate_key = \"{B}\"\n"),
                "t.toml:5: name: a second tunnel named tp0",
            ),
            (
                "[[tunnel]]\nname = \"a/b\"\n".to_string(),
                "t.toml:2: name: interface name",
            ),
            ("".to_string(), "no [[tunnel]]"),
        ];
        for (text, want) in cases {
            let e = parse_toml(Path::new("t.toml"), &text, 0o600)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn key_files_must_be_private() {
        let dir = std::env::temp_dir().join(format!("tapir-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("private.key");
        std::fs::write(&key, format!("{A}\n")).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let conf = dir.join("tp0.conf");
        let text = "[Interface]\nPrivateKeyFile = private.key\n";
        let e = parse(&conf, IfName::new("tp0").unwrap(), text, 0o600)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("readable by group or others") && e.contains("chmod 600"),
            "{e}"
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = parse(&conf, IfName::new("tp0").unwrap(), text, 0o600).unwrap();
        assert_eq!(c.private_key.to_base64(), A);
        // A directory is no key file.
        let e = parse(
            &conf,
            IfName::new("tp0").unwrap(),
            "[Interface]\nPrivateKeyFile = .\n",
            0o600,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("is not a file"), "{e}");
        // An inline key in a file others can read: refused.
        let e = parse(
            &conf,
            IfName::new("tp0").unwrap(),
            &format!("[Interface]\nPrivateKey = {A}\n"),
            0o644,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(":2: PrivateKey: this file holds a private key") && e.contains("chmod 600"),
            "{e}"
        );
        // An inline preshared key likewise, in both formats.
        let e = parse(
            &conf,
            IfName::new("tp0").unwrap(),
            &format!("[Interface]\nPrivateKeyFile = private.key\n[Peer]\nPublicKey = {C}\nPresharedKey = {B}\n"),
            0o640,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(":5: PresharedKey: this file holds a preshared key"),
            "{e}"
        );
        let e = parse_toml(
            Path::new("t.toml"),
            &format!("[[tunnel]]\nname = \"tp0\"\nprivate_key_file = \"{}\"\n[[tunnel.peer]]\npublic_key = \"{C}\"\npreshared_key = \"{B}\"\n", key.display()),
            0o644,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(":6: preshared_key: this file holds a preshared key"),
            "{e}"
        );
        // A mistyped key line is not echoed.
        let e = parse(
            &conf,
            IfName::new("tp0").unwrap(),
            &format!("[Interface]\nPrivateKey {A}\n"),
            0o600,
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains(&A[..20]), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
