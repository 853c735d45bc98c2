//! WireGuard's cross-platform userspace API on `/var/run/wireguard/NAME.sock`,
//! the text protocol of wireguard-go and boringtun, so that stock `wg show`,
//! `wg show NAME dump` and `wg set NAME peer ...` work against tapir.
//!
//! ```text
//!   wg ──connect──▶ NAME.sock ──"get=1\n\n"──▶ get()  ──▶ key=value lines, "errno=0\n\n"
//!                             ──"set=1\n...\n\n"──▶ set() ──▶ "errno=N\n\n"
//! ```
//! The socket is root-only (mode 0600 in a 0755 directory): `get` returns the
//! private key, as `wg showconf` needs. In a network namespace other than
//! the host's, the socket is that namespace's own (see [`crate::scope`]).

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::ops::Range;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tapir_proto::wg::keys::{PresharedKey, PrivateKey, PublicKey, decode_hex32};
use tapir_proto::wg::tunnel::{PeerConfig, Tunnel};

/// Where the sockets live.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

const EINVAL: i32 = 22;
const EOPNOTSUPP: i32 = 95;
const EPROTO: i32 = 71;

/// The answer to `get=1`.
pub fn get(tunnel: &Tunnel, private_key: &PrivateKey, listen_port: u16) -> String {
    get_with(tunnel, Some(private_key), listen_port, 0, true)
}

/// Appends `s` to `out`; when `out` must grow, the old buffer is wiped
/// before it is freed (the reply holds keys: no copy is left behind).
fn push_wiping(out: &mut String, s: &str) {
    if out.capacity() - out.len() < s.len() {
        let mut bigger = String::with_capacity((out.len() + s.len()).max(2 * out.capacity()));
        bigger.push_str(out);
        let mut old = std::mem::replace(out, bigger);
        zeroize::Zeroize::zeroize(&mut old);
    }
    out.push_str(s);
}

/// [`get`] of an interface that may have no key yet, and a firewall mark.
/// Without `secrets` (tapir's own `tapir-get`, for `tapir status`), the
/// private key is replaced by `tapir_public_key=` and preshared keys are
/// left out: what only shows state carries no key.
pub fn get_with(
    tunnel: &Tunnel,
    private_key: Option<&PrivateKey>,
    listen_port: u16,
    fwmark: u32,
    secrets: bool,
) -> String {
    let mut out = get_head(private_key, listen_port, fwmark, secrets);
    get_peers(&mut out, tunnel, 0..tunnel.peer_count(), secrets);
    push_end(&mut out);
    out
}

/// The interface's lines of [`get_with`]'s reply.
pub fn get_head(
    private_key: Option<&PrivateKey>,
    listen_port: u16,
    fwmark: u32,
    secrets: bool,
) -> String {
    let mut out = String::with_capacity(1024);
    if let Some(k) = private_key {
        if secrets {
            // Straight into the reply (wiped once sent), through no other string.
            let hex = zeroize::Zeroizing::new(k.to_hex());
            push_wiping(&mut out, "private_key=");
            push_wiping(&mut out, &hex);
            push_wiping(&mut out, "\n");
        } else {
            push_wiping(
                &mut out,
                &format!("tapir_public_key={}\n", k.public_key().to_hex()),
            );
        }
    }
    push_wiping(&mut out, &format!("listen_port={listen_port}\n"));
    if fwmark != 0 {
        push_wiping(&mut out, &format!("fwmark={fwmark}\n"));
    }
    out
}

/// The lines of peers `which` (by index) of [`get_with`]'s reply, added
/// to `out` (a reply can be made a slice of peers at a time).
pub fn get_peers(out: &mut String, tunnel: &Tunnel, which: Range<usize>, secrets: bool) {
    for (config, endpoint, stats) in tunnel.peers_in(which) {
        push_wiping(out, &format!("public_key={}\n", config.public.to_hex()));
        if let Some(psk) = config.psk.as_ref().filter(|p| secrets && !p.is_zero()) {
            let hex = zeroize::Zeroizing::new(psk.to_hex());
            push_wiping(out, "preshared_key=");
            push_wiping(out, &hex);
            push_wiping(out, "\n");
        }
        if let Some(e) = endpoint {
            push_wiping(out, &format!("endpoint={e}\n"));
        }
        let (sec, nsec) = stats
            .last_handshake
            .map_or((0, 0), |d| (d.as_secs(), d.subsec_nanos()));
        push_wiping(
            out,
            &format!(
                "last_handshake_time_sec={sec}\nlast_handshake_time_nsec={nsec}\ntx_bytes={}\nrx_bytes={}\npersistent_keepalive_interval={}\n",
                stats.tx_bytes,
                stats.rx_bytes,
                config.keepalive.map_or(0, |k| k.as_secs())
            ),
        );
        for net in &config.allowed_ips {
            push_wiping(out, &format!("allowed_ip={net}\n"));
        }
        push_wiping(out, "protocol_version=1\n");
    }
}

/// Ends a reply built by `get_head` and `get_peers`: `errno=0` and the blank line.
pub fn push_end(out: &mut String) {
    push_wiping(out, "errno=0\n\n");
}

/// An endpoint as an address and port, an IPv6 link-local one with its
/// zone by number or by interface name as `wg` writes it
/// (`[fe80::1%eth0]:51820`, which the standard parser refuses).
pub fn scoped_endpoint(text: &str) -> Option<SocketAddr> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Some(a);
    }
    let (host, port) = text.strip_prefix('[')?.split_once("]:")?;
    let (ip, zone) = host.split_once('%')?;
    let ip: std::net::Ipv6Addr = ip.parse().ok()?;
    let scope = match zone.parse::<u32>() {
        Ok(n) => n,
        Err(_) => {
            let name = tapir_sys::IfName::new(zone).ok()?;
            tapir_sys::Netlink::open()
                .ok()?
                .link(name.as_str())
                .ok()??
                .index
        }
    };
    Some(SocketAddr::V6(std::net::SocketAddrV6::new(
        ip,
        port.parse().ok()?,
        0,
        scope,
    )))
}

/// A pending change to one peer, applied when the next peer starts or at the end.
#[derive(Clone)]
struct PeerChange {
    public: PublicKey,
    remove: bool,
    update_only: bool,
    psk: Option<PresharedKey>,
    endpoint: Option<SocketAddr>,
    keepalive: Option<u16>,
    replace_allowed_ips: bool,
    allowed_ips: Vec<IpNet>,
}

/// Whether change `c` leaves an existing peer as it is (a `wg syncconf`
/// of an unchanged file gives every peer again): then nothing is done, a
/// look-up and a comparison instead of the peer's routes taken apart and
/// made again (10,000 peers held the packet thread 5.2 ms so). Allowed IPs
/// in another order, or a given endpoint the peer roamed away from, are
/// changes.
fn changes_nothing(tunnel: &Tunnel, c: &PeerChange) -> bool {
    /// Longer lists take the usual way (the comparison here is quadratic).
    const SHORT: usize = 64;
    let Some((p, now_at)) = tunnel.peer_config(&c.public) else {
        return false;
    };
    let psk = match (&c.psk, &p.psk) {
        (None, _) => true,
        (Some(k), had) if k.is_zero() => had.is_none(),
        (Some(k), Some(had)) => k == had,
        (Some(_), None) => false,
    };
    let endpoint = c
        .endpoint
        .is_none_or(|e| p.endpoint == Some(e) && now_at == Some(e));
    let keepalive = c
        .keepalive
        .is_none_or(|k| p.keepalive == (k > 0).then(|| Duration::from_secs(k.into())));
    let ips = if c.allowed_ips.len() > SHORT || p.allowed_ips.len() > SHORT {
        false
    } else if c.replace_allowed_ips {
        // The list as the change would make it: each prefix once, in order.
        let mut kept = c
            .allowed_ips
            .iter()
            .enumerate()
            .filter(|&(i, n)| !c.allowed_ips[..i].contains(n))
            .map(|(_, n)| n);
        p.allowed_ips.iter().all(|n| kept.next() == Some(n)) && kept.next().is_none()
    } else {
        c.allowed_ips.iter().all(|n| p.allowed_ips.contains(n))
    };
    psk && endpoint && keepalive && ips
}

fn apply(tunnel: &mut Tunnel, c: &PeerChange) {
    if changes_nothing(tunnel, c) {
        return;
    }
    let exists = tunnel.peer_index(&c.public).is_some();
    let change = |p: &mut PeerConfig| {
        if let Some(psk) = c.psk.clone() {
            p.psk = (!psk.is_zero()).then_some(psk);
        }
        if let Some(e) = c.endpoint {
            p.endpoint = Some(e);
        }
        if let Some(k) = c.keepalive {
            p.keepalive = (k > 0).then(|| Duration::from_secs(k.into()));
        }
        if c.replace_allowed_ips {
            p.allowed_ips.clear();
        }
        // (A set: a list of 100,000 prefixes is checked in linear time.)
        let mut have: std::collections::HashSet<IpNet> = p.allowed_ips.iter().copied().collect();
        for net in &c.allowed_ips {
            if have.insert(*net) {
                p.allowed_ips.push(*net);
            }
        }
    };
    if exists {
        tunnel.update_peer(&c.public, change);
        // Given: sent there now, though the peer roamed from it (the
        // configured endpoint alone would not change, and nor would where
        // packets go).
        if let Some(e) = c.endpoint {
            tunnel.set_endpoint(&c.public, e);
        }
    } else if !c.update_only {
        let mut p = PeerConfig {
            public: c.public,
            psk: None,
            endpoint: None,
            allowed_ips: Vec::new(),
            keepalive: None,
            rate: None,
        };
        change(&mut p);
        tunnel.add_peer(p);
    }
}

/// Applies a `set=1` request (its lines after `set=1`). Interface keys that
/// would need a new socket or identity (`private_key`, `listen_port` with
/// another value than 0 or this one) are refused with EOPNOTSUPP; the whole
/// request is checked before anything is applied.
pub fn set(
    tunnel: &mut Tunnel,
    private_key: &PrivateKey,
    listen_port: u16,
    lines: &[String],
) -> Result<(), i32> {
    let own = tunnel.public_key();
    apply_set(tunnel, Some(own), &*parse_set(lines)?, &mut |s| {
        // A running tunnel keeps its key and port (see `Settings`).
        if s.private_key
            .as_ref()
            .is_some_and(|k| k.public_key() != private_key.public_key())
            || s.listen_port.is_some_and(|p| p != 0 && p != listen_port)
        {
            return Err(EOPNOTSUPP);
        }
        Ok(())
    })
    .map(|_| ())
}

/// The interface's own settings in a `set`, for the caller to apply.
#[derive(Debug, Default, Clone)]
pub struct Settings {
    /// `private_key=`: `Some(None)` clears it (all zeros).
    pub private_key: Option<PrivateKey>,
    /// The key was given as all zeros.
    pub clear_key: bool,
    /// `listen_port=`.
    pub listen_port: Option<u16>,
    /// `fwmark=` (0: off).
    pub fwmark: Option<u32>,
}

impl Settings {
    /// Whether these come from a whole configuration (`wg setconf`, `wg
    /// syncconf`, which always give the key and the mark, and port 0 for a
    /// file without ListenPort), not from `wg set`, which gives only what
    /// it is told.
    fn whole_config(&self) -> bool {
        (self.private_key.is_some() || self.clear_key) && self.fwmark.is_some()
    }
}

/// A `set=1` request read whole and checked (on the control thread): the
/// interface's settings and the changes to its peers, in order.
#[derive(Clone, Default)]
pub struct SetRequest {
    settings: Settings,
    /// The public key of the `private_key=` given, worked out once.
    new_public: Option<PublicKey>,
    changes: Vec<PeerChange>,
    replace_peers: bool,
}

impl SetRequest {
    /// The peers it gives an endpoint.
    pub fn endpoints_given(&self) -> impl Iterator<Item = PublicKey> + '_ {
        self.changes
            .iter()
            .filter(|c| c.endpoint.is_some())
            .map(|c| c.public)
    }
}

impl std::fmt::Debug for SetRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No keys: a request may carry the private key and preshared keys.
        write!(f, "SetRequest({} peer change(s))", self.changes.len())
    }
}

/// Reads a `set` request's lines (after `set=1`): EPROTO for a line that is
/// not `key=value` or a peer key before any `public_key`, EINVAL for a
/// value that is wrong (a public key of small order among them). Touches
/// no tunnel, so the control thread does it, not the packet thread.
pub fn parse_set<S: AsRef<str>>(lines: &[S]) -> Result<Box<SetRequest>, i32> {
    // Built where it stays (on the heap), not moved there with its keys.
    let mut r = Box::<SetRequest>::default();
    // Sized once: changes hold preshared keys, and a growing vector would
    // leave copies of them behind in what it frees.
    let peers = lines
        .iter()
        .filter(|l| l.as_ref().starts_with("public_key="))
        .count();
    r.changes.reserve_exact(peers);
    for line in lines {
        let (key, value) = line.as_ref().split_once('=').ok_or(EPROTO)?;
        match key {
            "private_key" => {
                let bytes = zeroize::Zeroizing::new(decode_hex32(value).map_err(|_| EINVAL)?);
                if *bytes == [0; 32] {
                    r.settings.clear_key = true;
                    r.settings.private_key = None;
                    r.new_public = None;
                } else {
                    let k = PrivateKey::from_hex(value).map_err(|_| EINVAL)?;
                    r.new_public = Some(k.public_key());
                    r.settings.private_key = Some(k);
                    r.settings.clear_key = false;
                }
            }
            "listen_port" => r.settings.listen_port = Some(value.parse().map_err(|_| EINVAL)?),
            "fwmark" => {
                r.settings.fwmark = Some(if value.is_empty() {
                    0
                } else {
                    value.parse().map_err(|_| EINVAL)?
                })
            }
            "replace_peers" => r.replace_peers = value == "true",
            "public_key" => r.changes.push(PeerChange {
                // Keys of small order: anyone could act as such a peer.
                public: decode_hex32(value)
                    .ok()
                    .and_then(|k| PublicKey::from_bytes(k).ok())
                    .ok_or(EINVAL)?,
                remove: false,
                update_only: false,
                psk: None,
                endpoint: None,
                keepalive: None,
                replace_allowed_ips: false,
                allowed_ips: Vec::new(),
            }),
            _ => {
                let c = r.changes.last_mut().ok_or(EPROTO)?;
                match key {
                    "remove" => c.remove = value == "true",
                    "update_only" => c.update_only = value == "true",
                    "preshared_key" => {
                        c.psk = Some(PresharedKey::from_random(
                            decode_hex32(value).map_err(|_| EINVAL)?,
                        ))
                    }
                    "endpoint" => {
                        let host = value.trim_start_matches('[').replace("]:", "|");
                        let addr = scoped_endpoint(value)
                            .or_else(|| {
                                let (h, p) = host.split_once('|')?;
                                Some(SocketAddr::new(h.parse().ok()?, p.parse().ok()?))
                            })
                            .ok_or(EINVAL)?;
                        c.endpoint = Some(addr);
                    }
                    "persistent_keepalive_interval" => {
                        c.keepalive = Some(value.parse().map_err(|_| EINVAL)?)
                    }
                    "replace_allowed_ips" => c.replace_allowed_ips = value == "true",
                    // Host bits cleared, as the kernel and wireguard-go keep it.
                    "allowed_ip" => c
                        .allowed_ips
                        .push(value.parse::<IpNet>().map_err(|_| EINVAL)?.trunc()),
                    "protocol_version" => {
                        if value != "1" {
                            return Err(EINVAL);
                        }
                    }
                    _ => return Err(EINVAL),
                }
            }
        }
    }
    Ok(r)
}

/// Applies a parsed `set` request's peer changes to `tunnel` and returns
/// its interface settings; `check` may refuse those first (then nothing is
/// applied). `own`: the interface's public key, if it has a key. A peer
/// with the interface's key (its own, or the one the request gives) is
/// refused; a new key removes a peer that has it (as wireguard-go does).
/// Each change costs a hash look-up, whatever the number of peers.
pub fn apply_set(
    tunnel: &mut Tunnel,
    own: Option<PublicKey>,
    request: &SetRequest,
    check: &mut dyn FnMut(&Settings) -> Result<(), i32>,
) -> Result<Settings, i32> {
    // Read in place, keys copied only as clones that wipe themselves: the
    // request is wiped where it is when its owner drops it.
    let SetRequest {
        settings,
        new_public,
        changes,
        replace_peers,
    } = request;
    let (new_public, replace_peers) = (*new_public, *replace_peers);
    let mine = if settings.clear_key {
        None
    } else {
        new_public.or(own)
    };
    if mine.is_some_and(|m| changes.iter().any(|c| c.public == m)) {
        return Err(EINVAL);
    }
    check(settings)?;
    // Removals in one go (a few leave one at a time, many in one rebuild
    // of the peer indices and routes: `Tunnel::remove_peers`): the peers
    // a replace leaves out, those removed by name, and one with the new key.
    let mut gone: std::collections::HashSet<PublicKey> = new_public.into_iter().collect();
    if replace_peers {
        // All of them, as the kernel and wireguard-go do: a peer the file
        // names again comes back afresh, with nothing the file leaves out
        // (an old preshared key, endpoint or keepalive, its sessions).
        gone.extend(tunnel.peers().map(|(p, _, _)| p.public));
    }
    // In order, as if one by one: what comes before a peer's removal is
    // moot, what comes after it adds the peer afresh.
    let last_removal: std::collections::HashMap<PublicKey, usize> = changes
        .iter()
        .enumerate()
        .filter(|(_, c)| c.remove)
        .map(|(i, c)| (c.public, i))
        .collect();
    gone.extend(last_removal.keys());
    tunnel.remove_peers(&gone);
    for (i, c) in changes.iter().enumerate() {
        if !c.remove && last_removal.get(&c.public).is_none_or(|&r| i > r) {
            apply(tunnel, c);
        }
    }
    Ok(settings.clone())
}

/// The listening control socket of one interface; removed on drop.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    /// Where it can be reached: its own path and, in a namespace other than
    /// the host's, the link that stock `wg` finds. Each is removed on drop
    /// if it is still this socket.
    paths: Vec<PathBuf>,
    /// The path stock `wg` knows (`dir/NAME.sock`), which may come to be
    /// this socket's later (see [`hand_over`]).
    usual: PathBuf,
    ino: u64,
    /// A namespace's own directory, removed on drop once empty.
    home: Option<PathBuf>,
    /// Requests from the connections' threads, kept from one [`ControlSocket::run`]
    /// to the next (a tunnel of `wireguard-go`'s kind serves its first
    /// requests before it has a key, the rest after).
    jobs: Jobs,
}

/// Requests the connections' threads hand over, and the bell they ring.
#[derive(Debug)]
struct Jobs {
    tx: mpsc::Sender<Job>,
    rx: Mutex<mpsc::Receiver<Job>>,
    bell: Option<Arc<super::bell::Bell>>,
    counts: Arc<ClientCounts>,
}

impl Jobs {
    fn new() -> Self {
        let (tx, rx) = mpsc::channel();
        Self {
            tx,
            rx: Mutex::new(rx),
            bell: super::bell::Bell::new().ok().map(Arc::new),
            counts: Arc::default(),
        }
    }

    /// Hands the requests waiting to `answer`.
    fn answer(&self, answer: &mut dyn FnMut(Request, Reply)) {
        let rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        while let Ok(Job(request, reply)) = rx.try_recv() {
            answer(request, Reply(reply));
        }
    }
}

/// Whether a control socket answers at `path`.
fn answers(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// The path stock `wg` knows for `name` (`dir/NAME.sock`), left free by
/// a tunnel that went: given to a tunnel of that name in another namespace
/// that answers (`dir/netns-INODE-COOKIE/NAME.sock`), as a second name of its socket,
/// so that `wg show NAME` there finds it again; the host's tunnel, whose
/// own path it is, takes it back when it starts. Returns the new holder.
pub fn hand_over(dir: &Path, name: &str) -> Option<PathBuf> {
    let wg = dir.join(format!("{name}.sock"));
    if std::fs::symlink_metadata(&wg).is_ok() {
        return None;
    }
    let mut homes: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("netns-"))
        })
        .collect();
    homes.sort();
    for home in homes {
        let sock = home.join(format!("{name}.sock"));
        if !answers(&sock) {
            continue;
        }
        let via = home.join(format!(".{name}.handover.{}", std::process::id()));
        if second_name(&sock, &via, &wg).is_ok() {
            return Some(sock);
        }
    }
    None
}

/// Gives socket `sock` the second name `wg`: linked at `via` beside it,
/// then renamed into place, so that `wg` is never half there.
fn second_name(sock: &Path, via: &Path, wg: &Path) -> io::Result<()> {
    let _ = std::fs::remove_file(via);
    let named = std::fs::hard_link(sock, via).and_then(|()| std::fs::rename(via, wg));
    if named.is_err() {
        let _ = std::fs::remove_file(via);
    }
    named
}

impl ControlSocket {
    /// Binds the control socket of tunnel `name` in this network namespace
    /// (see [`crate::scope`]): `/var/run/wireguard/NAME.sock` in the host's
    /// namespace; in another, `/var/run/wireguard/netns-INODE-COOKIE/NAME.sock` and,
    /// if no other namespace's tunnel holds the name, a link at the usual
    /// path for `wg`. A stale socket is replaced; one that another process
    /// answers on is not, but for such a link answered from another
    /// namespace, which the host's tunnel of that name takes over (the path
    /// is the host's). Returns notes for the log (what `wg` cannot see).
    ///
    /// The directories must be root's (ours) and writable by nobody else,
    /// or anyone could plant or swap sockets in them; they are created
    /// 0755. The socket is bound in a private 0700 directory, made 0600
    /// there, and renamed into place, so it is never reachable with another
    /// mode, whatever the umask.
    pub fn bind(name: &str) -> Result<(Self, Vec<String>), String> {
        let scope = crate::scope::Scope::current()?;
        Self::bind_in(Path::new(SOCKET_DIR), &scope, name)
    }

    /// [`ControlSocket::bind`] under another directory (for tests).
    pub fn bind_in(
        dir: &Path,
        scope: &crate::scope::Scope,
        name: &str,
    ) -> Result<(Self, Vec<String>), String> {
        use std::os::unix::fs::MetadataExt;
        ensure_private_dir(dir)?;
        let home = scope.dir(dir);
        ensure_private_dir(&home)?;
        let path = home.join(format!("{name}.sock"));
        let mut notes = Vec::new();
        if path.exists() {
            match UnixStream::connect(&path) {
                // In the host's namespace the usual path may be another
                // namespace's tunnel's second name (see below): the path is
                // the host's, so its tunnel of that name takes it over (the
                // rename below replaces it); the other keeps its own path.
                Ok(s) if scope.is_initial() && peer_pid(&s).is_some_and(|p| !scope.holds(p)) => {
                    notes.push(format!(
                        "{} was the second name of a tunnel named {name} in another network namespace; it is this tunnel's now (`tapir status {name}` in that namespace still sees that one)",
                        path.display()
                    ));
                }
                Ok(_) => {
                    return Err(format!(
                        "{} is in use by another process: a tunnel named {name} already runs in this network namespace",
                        path.display()
                    ));
                }
                Err(_) => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let staging = home.join(format!(".{name}.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&staging)
                .map_err(|e| format!("{}: {e}", staging.display()))?;
        }
        let result = (|| {
            let tmp = staging.join("sock");
            let listener =
                UnixListener::bind(&tmp).map_err(|e| format!("{}: {e}", path.display()))?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let ino = std::fs::metadata(&tmp)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .ino();
            std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            let mut paths = vec![path.clone()];
            if !scope.is_initial() {
                // The path stock `wg` knows, as a second name of the same socket.
                let wg = dir.join(format!("{name}.sock"));
                if answers(&wg) {
                    notes.push(format!(
                        "`wg show {name}` and `wg set {name}` here reach the tunnel of that name in another network namespace, not this one: {} is its socket (wg looks only there; tapir status {name} sees this one; name it otherwise to use wg with it)",
                        wg.display()
                    ));
                } else {
                    match second_name(&path, &staging.join("wg"), &wg) {
                        Ok(()) => paths.push(wg),
                        Err(e) => notes.push(format!(
                            "`wg show {name}` cannot see this tunnel: {}: {e}",
                            wg.display()
                        )),
                    }
                }
            }
            Ok(Self {
                listener,
                paths,
                usual: dir.join(format!("{name}.sock")),
                ino,
                home: (!scope.is_initial()).then(|| home.clone()),
                jobs: Jobs::new(),
            })
        })();
        let _ = std::fs::remove_dir_all(&staging);
        result.map(|s| (s, notes))
    }

    /// Serves connections until `stop`, each on a thread of its own (up to
    /// [`CLIENT_THREADS`] at once; past them, one at a time on this one),
    /// within [`DEADLINE`] in all and with lines of at most [`MAX_LINE`]
    /// bytes, so a slow or hostile client holds up only itself: ten that
    /// never finished a request held a `wg show` up for 20 s when they were
    /// served one after another. The connections' threads read requests
    /// and write replies; `answer`, which turns a request into the reply
    /// (the tunnel's own thread computes it), runs here, one request at a
    /// time. `idle` runs between: when `bell` rings, and every `tick` if
    /// one is given (nothing else wakes this thread). A client in another
    /// network namespace (a `wg` there that found this socket under a name
    /// its own tunnel would have) is refused: it would see and change
    /// another namespace's tunnel.
    pub fn run(
        &self,
        stop: &dyn Fn() -> bool,
        bell: Option<&Arc<super::bell::Bell>>,
        tick: Option<Duration>,
        answer: &mut dyn FnMut(Request, Reply),
        idle: &mut dyn FnMut(),
    ) {
        let jobs = &self.jobs;
        let mut set = tapir_sys::poll::PollSet::new();
        // Connections past the threads' that have sent nothing yet: waited
        // for here, each until it has (then served) or its DEADLINE passes,
        // where each held this thread its 2 s in turn (200 idle ones held
        // a `wg show` 28 s).
        let mut parked: std::collections::VecDeque<(UnixStream, Instant)> =
            std::collections::VecDeque::new();
        // A connection on a thread of its own, where one is free: `None`;
        // else it is given back, for this thread.
        let on_a_thread = |stream: UnixStream| match &jobs.bell {
            Some(b) if jobs.counts.threads.load(Ordering::Acquire) < CLIENT_THREADS => {
                Client::spawn(stream, &jobs.tx, b, &jobs.counts).err()
            }
            _ => Some(stream),
        };
        let serve_here = |stream: UnixStream, answer: &mut dyn FnMut(Request, Reply)| {
            // (Here, a reply sent later is waited for.)
            serve_or_refuse(stream, &jobs.counts.refused, &mut |request| {
                let (tx, rx) = mpsc::channel();
                answer(request, Reply(tx));
                rx.recv().unwrap_or_else(|_| "errno=5\n\n".to_string())
            });
        };
        while !stop() {
            idle();
            jobs.answer(answer);
            let now = Instant::now();
            parked.retain(|(_, since)| now.duration_since(*since) < DEADLINE);
            set.clear();
            let listening = set.add(std::os::fd::AsFd::as_fd(&self.listener), true, false);
            let rung = bell.map(|b| set.add(b.fd(), true, false));
            let rung_jobs = jobs.bell.as_ref().map(|b| set.add(b.fd(), true, false));
            let first_parked = set.len();
            for (s, _) in &parked {
                set.add(std::os::fd::AsFd::as_fd(s), true, false);
            }
            let wait = match (parked.front(), tick) {
                (Some((_, since)), t) => {
                    let left = DEADLINE.saturating_sub(now.duration_since(*since));
                    t.map_or(left, |t| t.min(left))
                }
                (None, t) => t.unwrap_or(super::bell::FOREVER),
            };
            if set.wait(wait).is_err() {
                // Only EINTR is retried inside; anything else would repeat at once.
                std::thread::sleep(Duration::from_millis(250));
                continue;
            }
            // Those that sent something (or closed): taken out, then
            // served oldest first, on a thread of their own where one is
            // free; one whose time ran out meanwhile is closed.
            let ready: Vec<usize> = (0..parked.len())
                .filter(|&i| set.readable(first_parked + i))
                .collect();
            let mut taken: Vec<(UnixStream, Instant)> = ready
                .into_iter()
                .rev()
                .filter_map(|i| parked.remove(i))
                .collect();
            taken.reverse();
            for (stream, since) in taken {
                if since.elapsed() >= DEADLINE {
                    continue;
                }
                let Some(stream) = on_a_thread(stream) else {
                    continue;
                };
                serve_here(stream, answer);
                jobs.answer(answer);
            }
            for (b, i) in [(bell, rung), (jobs.bell.as_ref(), rung_jobs)] {
                if let (Some(b), Some(i)) = (b, i) {
                    if set.readable(i) {
                        b.drain();
                    }
                }
            }
            if !set.readable(listening) {
                continue;
            }
            // A few at a time, the threads' requests answered between: a
            // steady stream of connections kept them waiting for as long.
            for _ in 0..ACCEPTS_PER_PASS {
                let stream = match self.listener.accept() {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of descriptors: the oldest parked one goes,
                        // where the listener, readable still, would have
                        // this thread spin until they expired.
                        if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                            parked.pop_front();
                        }
                        break;
                    }
                };
                let Some(stream) = on_a_thread(stream) else {
                    continue;
                };
                // Nothing to read yet: parked (at most PARKED, the oldest
                // going first), not waited for here.
                let mut one = tapir_sys::poll::PollSet::new();
                one.add(std::os::fd::AsFd::as_fd(&stream), true, false);
                let has_data = one.wait(Duration::ZERO).is_ok() && one.readable(0);
                if !has_data {
                    if parked.len() >= PARKED {
                        parked.pop_front();
                    }
                    parked.push_back((stream, Instant::now()));
                    continue;
                }
                serve_here(stream, answer);
                jobs.answer(answer);
                if stop() {
                    return;
                }
            }
        }
    }
}

/// At most this many control connections are served at once on threads
/// of their own; more are served one at a time on the control thread.
pub const CLIENT_THREADS: usize = 16;
/// Connections past the threads' waited for on the control thread until
/// they send their request (beyond, the oldest is closed): well under the
/// usual 1024 descriptors a process may hold.
const PARKED: usize = 256;
/// Connections taken between two looks at the threads' requests.
const ACCEPTS_PER_PASS: usize = 8;

/// A request from a connection's thread, and where its reply goes.
#[derive(Debug)]
struct Job(Request, mpsc::Sender<String>);

/// Where the reply to one request goes: sent at once, or later from
/// another thread (a reload, which waits for host names, while the
/// control thread answers other requests).
#[derive(Debug)]
pub struct Reply(mpsc::Sender<String>);

impl Reply {
    /// Sends the reply (dropped if the client is gone).
    pub fn send(self, reply: String) {
        let _ = self.0.send(reply);
    }
}

/// What the control thread and its connections' threads count together.
#[derive(Debug, Default)]
struct ClientCounts {
    /// Connections' threads running.
    threads: AtomicUsize,
    /// Connections refused (another network namespace).
    refused: AtomicU64,
}

/// A connection's thread: it reads the requests and writes the replies;
/// the control thread answers them.
struct Client {
    jobs: mpsc::Sender<Job>,
    bell: Arc<super::bell::Bell>,
    counts: Arc<ClientCounts>,
}

impl Client {
    /// Serves `stream` on a thread of its own; the stream back if no
    /// thread could be made.
    fn spawn(
        stream: UnixStream,
        jobs: &mpsc::Sender<Job>,
        bell: &Arc<super::bell::Bell>,
        counts: &Arc<ClientCounts>,
    ) -> Result<(), UnixStream> {
        let c = Client {
            jobs: jobs.clone(),
            bell: Arc::clone(bell),
            counts: Arc::clone(counts),
        };
        counts.threads.fetch_add(1, Ordering::AcqRel);
        // The stream comes back through the slot if the thread is not made.
        let slot = Arc::new(Mutex::new(Some(stream)));
        let theirs = Arc::clone(&slot);
        let made = std::thread::Builder::new()
            .name("tapir-control".into())
            .spawn(move || {
                // Counted out however it ends (a panic too).
                let _out = CountedOut(&c.counts.threads);
                let stream = theirs.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(stream) = stream {
                    c.serve(stream);
                }
            });
        match made {
            Ok(_) => Ok(()),
            Err(_) => {
                counts.threads.fetch_sub(1, Ordering::AcqRel);
                let back = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                back.map_or(Ok(()), Err)
            }
        }
    }

    fn serve(&self, stream: UnixStream) {
        let mut ask = |request: Request| {
            let (tx, rx) = mpsc::channel();
            if self.jobs.send(Job(request, tx)).is_err() {
                return "errno=5\n\n".to_string(); // EIO: the tunnel is going
            }
            self.bell.ring();
            rx.recv().unwrap_or_else(|_| "errno=5\n\n".to_string())
        };
        serve_or_refuse(stream, &self.counts.refused, &mut ask);
    }
}

/// Takes one off a count when dropped.
struct CountedOut<'a>(&'a AtomicUsize);

impl Drop for CountedOut<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves one connection, or refuses it if it comes from another network
/// namespace.
fn serve_or_refuse(
    stream: UnixStream,
    refused: &AtomicU64,
    answer: &mut dyn FnMut(Request) -> String,
) {
    let fd = std::os::fd::AsFd::as_fd(&stream);
    if tapir_sys::netns::peer_is_local(fd) == Some(false) {
        // Told why (EREMOTE: "Object is remote"), where a closed
        // connection left `wg` with a broken pipe or "Protocol error": its
        // request read first (a socket closed with data unread resets the
        // connection, and the reply with it), for 200 ms at most.
        refuse(&stream);
        // Once: a plain `wg show` in any namespace asks every tunnel it
        // finds, and filled the log.
        if refused.fetch_add(1, Ordering::Relaxed) == 0 {
            eprintln!(
                "tapir: refused a control connection from another network namespace (pid {}): this tunnel answers only its own (wg show there finds it, but not its details; further ones are not logged)",
                peer_pid(&stream).map_or("unknown".into(), |p| p.to_string())
            );
        }
        return;
    }
    let _ = serve_connection(stream, answer);
}

/// Answers a client of another namespace EREMOTE once its request is in
/// (or 200 ms passed), without serving it.
fn refuse(stream: &UnixStream) {
    let deadline = Instant::now() + Duration::from_millis(200);
    let mut buf = [0u8; 4096];
    // The last byte read, and what came after it (a request ends "\n\n").
    let mut seen = Vec::new();
    // Its first bytes: a `set` is answered with a negative errno.
    let mut first = Vec::new();
    let _ = stream.set_nonblocking(false);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match (&*stream).read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if first.len() < 6 {
                    first.extend_from_slice(&buf[..n.min(6 - first.len())]);
                }
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(2).any(|w| w == b"\n\n") {
                    break;
                }
                seen.drain(..seen.len() - 1);
            }
        }
    }
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    let sign = if first.starts_with(b"set=1\n") {
        "-"
    } else {
        ""
    };
    let _ = (&*stream).write_all(format!("errno={sign}{}\n\n", libc::EREMOTE).as_bytes());
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let ours = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.ino() == self.ino);
        // Its own path first, then the usual one (its second name, or its
        // only one in the host's namespace): each only if it is still this
        // socket, as another tunnel may have taken the name.
        for p in self.paths.iter().filter(|p| **p != self.usual) {
            if ours(p) {
                let _ = std::fs::remove_file(p);
            }
        }
        if ours(&self.usual) {
            let _ = std::fs::remove_file(&self.usual);
            // Free now: to a tunnel of the same name in another namespace.
            if let (Some(dir), Some(name)) = (self.usual.parent(), self.usual.file_stem()) {
                hand_over(dir, &name.to_string_lossy());
            }
        }
        if let Some(home) = &self.home {
            // Only once empty: another tunnel of this namespace may be in it.
            let _ = std::fs::remove_dir(home);
        }
    }
}

/// Makes sure `dir` is a directory of our own that nobody else may write
/// to: created 0755 if missing; refused, with what to do, if it is a
/// symbolic link, someone else's, or group- or world-writable.
pub fn ensure_private_dir(dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if std::fs::symlink_metadata(dir).is_err() {
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        match std::fs::DirBuilder::new().mode(0o755).create(dir) {
            Ok(()) => {
                // The umask may have taken bits away; set exactly 0755.
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                    .map_err(|e| format!("{}: {e}", dir.display()))?;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        }
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.file_type().is_dir() {
        return Err(format!(
            "{} is not a directory (a symbolic link?): remove it, and tapir creates it",
            dir.display()
        ));
    }
    if meta.uid() != me {
        return Err(format!(
            "{} belongs to uid {}, not to us (uid {me}): someone could plant sockets there; remove it, or chown {me} it",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is writable by group or others (mode {:o}): chmod 755 {0}",
            dir.display(),
            meta.mode() & 0o777
        ));
    }
    trusted_above(dir)
}

/// Whether `uid` is root's or this process's (whose files tapir may act on).
pub fn root_or_us(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// Checks, before anything in `dir` is read and acted on (a pid to signal,
/// rules to take back, hooks to run as root), that nobody else could have
/// put it there: `dir` (if it exists) is root's or ours and closed to
/// others, and so is each directory above it, as [`ensure_private_dir`]
/// makes them.
pub fn trusted_dir(dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return trusted_above(dir);
    };
    let owner_ok = root_or_us(meta.uid());
    if !meta.is_dir() || !owner_ok || meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is not a directory of ours that only we may write (uid {}, mode {:o}): tapir does not act on what it holds; remove it",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o7777
        ));
    }
    trusted_above(dir)
}

/// Each directory above `dir` (the path resolved) belongs to root or us,
/// and is closed to others unless sticky (as /tmp is: there others cannot
/// move or replace what is ours).
pub fn trusted_above(dir: &std::path::Path) -> Result<(), String> {
    // The deepest part that exists, resolved (/var/run is a link to /run).
    let mut existing = dir;
    let real = loop {
        match existing.canonicalize() {
            Ok(r) => break r,
            Err(_) => match existing.parent() {
                Some(p) => existing = p,
                None => return Ok(()),
            },
        }
    };
    let start = if existing == dir {
        real.parent()
    } else {
        Some(real.as_path())
    };
    match start {
        Some(s) => trusted_chain(s, dir),
        None => Ok(()),
    }
}

/// Directory `dir` (not resolved: a link's own directory) and each above
/// it, as [`trusted_above`] checks them.
pub fn trusted_dir_and_above(dir: &std::path::Path) -> Result<(), String> {
    let real = dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    trusted_chain(&real, dir)
}

/// `start` and each directory above it: root's or ours, and closed to
/// others unless sticky; `named` for the message.
fn trusted_chain(start: &std::path::Path, named: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let dir = named;
    for a in start.ancestors() {
        let m = std::fs::metadata(a).map_err(|e| format!("{}: {e}", a.display()))?;
        let owner_ok = root_or_us(m.uid());
        let open = m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0;
        if !owner_ok || open {
            return Err(format!(
                "{}, above {}, {}: someone else could put something of theirs where tapir reads and acts on it; use directories of root's (as /run and /etc are)",
                a.display(),
                dir.display(),
                if owner_ok {
                    format!("writable by others (mode {:o})", m.mode() & 0o7777)
                } else {
                    format!("belongs to uid {}", m.uid())
                }
            ));
        }
    }
    Ok(())
}

/// The text of record `path` (a pid file, a crash record) if tapir wrote
/// it: a regular file of root's or ours that nobody else may write, read
/// without following a link; `Ok(None)` if there is none.
pub fn read_own_file(path: &std::path::Path) -> Result<Option<String>, String> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let m = f
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let owner_ok = root_or_us(m.uid());
    if !m.is_file() || !owner_ok || m.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is not a file tapir wrote (uid {}, mode {:o}): not acted on; look at it, then remove it",
            path.display(),
            m.uid(),
            m.mode() & 0o7777
        ));
    }
    let mut text = String::new();
    (&f).take(1 << 20)
        .read_to_string(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Some(text))
}

/// The pid of the process at the other end of `stream` (`SO_PEERCRED`).
pub fn peer_pid(stream: &UnixStream) -> Option<i32> {
    nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .ok()
        .map(|c| c.pid())
}

/// How long one control connection may take, all requests included.
pub const DEADLINE: Duration = Duration::from_secs(2);
/// The longest request line (a key, `=`, a value: far less is used).
pub const MAX_LINE: usize = 4096;
/// The most lines in one request (a `set` for many peers: 10,000 peers
/// with 20 allowed IPs each take 250,000 lines and 4 MB).
pub const MAX_LINES: usize = 1_500_000;
/// The most bytes in one request.
pub const MAX_REQUEST: usize = 32 << 20;

/// A request on the control socket.
#[derive(Debug, Clone)]
pub enum Request {
    /// `get=1`: WireGuard's view.
    Get,
    /// `tapir-get=1`: WireGuard's view and tapir's own lines.
    TapirGet,
    /// `set=1`, its lines read and checked (boxed: moved from thread to
    /// thread by its pointer, keys and all staying where they are).
    Set(Box<SetRequest>),
    /// `tapir-reload=1`: read the config file again and apply it (the
    /// control thread turns it into [`Request::Apply`]).
    Reload,
    /// What a reload wants (never read from the socket).
    Apply(Box<Reapply>),
}

/// What a reload asks of the packet thread, as `wg syncconf` would: the
/// peers, and the key and port as the file gives them, compared there with
/// what runs (a `wg set` since the last reload included).
#[derive(Debug, Clone)]
pub struct Reapply {
    /// The peers as they should be.
    pub peers: Vec<PeerConfig>,
    /// The interface's key.
    pub private_key: PrivateKey,
    /// Its port; none keeps the one in use (as `listen_port=0` does).
    pub listen_port: Option<u16>,
    /// The peers whose endpoint the file gives as a host name, with it.
    pub host_names: Vec<(PublicKey, String)>,
}

/// The lines of one control connection, read into a buffer of fixed size
/// that is wiped when the connection ends: requests carry keys, and no
/// copy of one may be left in freed memory (a growing buffer leaves one at
/// each move).
struct Lines {
    stream: UnixStream,
    buf: zeroize::Zeroizing<Vec<u8>>,
    start: usize,
    end: usize,
    eof: bool,
}

impl Lines {
    fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            buf: zeroize::Zeroizing::new(vec![0; 2 * MAX_LINE + 2]),
            start: 0,
            end: 0,
            eof: false,
        }
    }

    /// The next line, without its line end, read before `deadline`; `None`
    /// once the client closed its end. A line longer than [`MAX_LINE`] is
    /// an error.
    fn next(
        &mut self,
        deadline: std::time::Instant,
    ) -> io::Result<Option<zeroize::Zeroizing<String>>> {
        loop {
            let pending = &self.buf[self.start..self.end];
            let cut = match pending.iter().position(|b| *b == b'\n') {
                Some(i) => Some((i, i + 1)),
                None if self.eof && !pending.is_empty() => Some((pending.len(), pending.len())),
                None if self.eof => return Ok(None),
                None => None,
            };
            if let Some((len, used)) = cut {
                if len > MAX_LINE {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "control request line too long",
                    ));
                }
                let text = std::str::from_utf8(&pending[..len])
                    .map_err(|_| {
                        io::Error::new(io::ErrorKind::InvalidData, "control request not UTF-8")
                    })?
                    .trim_end();
                // Its exact size: never grown, so never moved.
                let mut line = zeroize::Zeroizing::new(String::with_capacity(text.len()));
                line.push_str(text);
                self.start += used;
                return Ok(Some(line));
            }
            if pending.len() > MAX_LINE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "control request line too long",
                ));
            }
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "control request too slow",
                ));
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut self.buf[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "control request too slow",
                    ));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Writes all of `bytes` by `deadline`, the connection's, as its reading
/// is: a client that reads its reply a few bytes at a time holds the
/// control thread no longer than one that writes its request so. (A
/// blocking write with a timeout does not do it: the kernel waits afresh
/// for each piece of buffer the reader frees, so one large write to a
/// slow reader lasts as long as the reader likes.)
fn write_by(w: &mut UnixStream, bytes: &[u8], deadline: std::time::Instant) -> io::Result<()> {
    use std::os::fd::AsFd;
    let too_slow = || io::Error::new(io::ErrorKind::TimedOut, "control reply read too slowly");
    w.set_nonblocking(true)?;
    let mut at = 0;
    let written = loop {
        if at == bytes.len() {
            break Ok(());
        }
        match w.write(&bytes[at..]) {
            Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break Err(too_slow());
                }
                let mut room = tapir_sys::poll::PollSet::new();
                room.add(w.as_fd(), false, true);
                if let Err(e) = room.wait(left) {
                    break Err(e);
                }
            }
            Err(e) => break Err(e),
        }
    };
    // The descriptor is shared with the request reader, which blocks.
    w.set_nonblocking(false)?;
    written
}

fn serve_connection(
    stream: UnixStream,
    answer: &mut dyn FnMut(Request) -> String,
) -> io::Result<()> {
    let deadline = std::time::Instant::now() + DEADLINE;
    stream.set_nonblocking(false)?;
    let lines_in = Lines::new(stream.try_clone()?);
    let mut writer = stream.try_clone()?;
    match serve_requests(lines_in, stream, answer, deadline) {
        // A line that is no line of the protocol (not UTF-8, past
        // MAX_LINE): the client hears why before the close (it heard
        // nothing, or a reset), as of an over-long request.
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            let errno = if e.to_string().contains("too long") {
                7
            } else {
                EPROTO
            };
            let _ = write_by(
                &mut writer,
                format!("errno=-{errno}\n\n").as_bytes(),
                deadline,
            );
            // What it still sends is read and dropped (until the deadline,
            // 64 MiB at most): closed with it unread, the socket would be
            // reset, and the answer lost with it.
            let _ = writer.shutdown(std::net::Shutdown::Write);
            let mut sink = [0u8; 16384];
            let mut left: usize = 64 << 20;
            while left > 0 {
                let wait = deadline.saturating_duration_since(std::time::Instant::now());
                if wait.is_zero() || writer.set_read_timeout(Some(wait)).is_err() {
                    break;
                }
                match writer.read(&mut sink) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
            Err(e)
        }
        other => other,
    }
}

fn serve_requests(
    mut lines_in: Lines,
    stream: UnixStream,
    answer: &mut dyn FnMut(Request) -> String,
    deadline: std::time::Instant,
) -> io::Result<()> {
    let mut writer = stream;
    loop {
        let Some(first) = lines_in.next(deadline)? else {
            return Ok(());
        };
        let mut lines = Vec::new();
        let mut bytes = 0;
        let mut too_long = false;
        while let Some(l) = lines_in.next(deadline)? {
            if l.is_empty() {
                break;
            }
            bytes += l.len() + 1;
            // Past the limits the rest is read (within the deadline) and
            // dropped, so that the client hears why, not a closed socket.
            if too_long || lines.len() >= MAX_LINES || bytes > MAX_REQUEST {
                if !too_long {
                    lines = Vec::new();
                }
                too_long = true;
                continue;
            }
            lines.push(l);
        }
        if too_long {
            eprintln!(
                "tapir: a control request of more than {MAX_LINES} lines or {} MiB was refused, nothing changed (E2BIG)",
                MAX_REQUEST >> 20
            );
            write_by(&mut writer, b"errno=-7\n\n", deadline)?;
            continue;
        }
        let request = match first.as_str() {
            "get=1" => Request::Get,
            "tapir-get=1" => Request::TapirGet,
            // Read and checked here, on the control thread: the packet
            // thread only applies it.
            "set=1" => match parse_set(&lines) {
                Ok(r) => Request::Set(r),
                Err(errno) => {
                    write_by(
                        &mut writer,
                        format!("errno=-{errno}\n\n").as_bytes(),
                        deadline,
                    )?;
                    continue;
                }
            },
            "tapir-reload=1" => Request::Reload,
            _ => {
                write_by(
                    &mut writer,
                    format!("errno={EPROTO}\n\n").as_bytes(),
                    deadline,
                )?;
                return Ok(());
            }
        };
        drop(lines);
        let set = matches!(request, Request::Set(_));
        // A reply may hold the private key: wiped once sent.
        let mut reply = answer(request);
        if set {
            reply = set_errno(reply);
        }
        // The reply has its own time (the request may have waited for the
        // control thread, behind others).
        let sent = write_by(
            &mut writer,
            reply.as_bytes(),
            std::time::Instant::now() + DEADLINE,
        );
        zeroize::Zeroize::zeroize(&mut reply);
        sent?;
    }
}

/// A `set` reply's errno as `wg` reads it: negative (`errno=-98`, as
/// wireguard-go and the kernel's -errno), where a `get` reply's is
/// positive; `wg` printed a positive one as "Unknown error -98".
fn set_errno(reply: String) -> String {
    match reply
        .strip_prefix("errno=")
        .and_then(|r| r.strip_suffix("\n\n"))
        .and_then(|n| n.parse::<i32>().ok())
    {
        Some(n) if n > 0 => format!("errno=-{n}\n\n"),
        _ => reply,
    }
}

/// The interface a running tunnel answers for, besides its key (the
/// tunnel's: `wg set NAME private-key FILE` changes it there): its port
/// (`wg set NAME listen-port P`: the socket moved there by `rebind`), and
/// its firewall mark (`wg set NAME fwmark M`, as wg-quick does for default
/// routes), applied to its sockets by `mark`.
pub struct Interface<'a> {
    /// Its port.
    pub listen_port: u16,
    /// Moves the tunnel's socket to another port (an errno if it cannot:
    /// the port is taken, or the transport cannot).
    pub rebind: &'a mut dyn FnMut(u16) -> Result<(), i32>,
    /// Its mark (0: none).
    pub fwmark: &'a mut u32,
    /// Puts a mark on the tunnel's sockets.
    pub mark: &'a mut dyn FnMut(u32) -> io::Result<()>,
}

/// Gives the tunnel key `k`, if it is new (`false` if not), and says so.
fn new_key(tunnel: &mut Tunnel, k: PrivateKey) -> bool {
    let changed = tunnel.set_private_key(k);
    if changed {
        eprintln!(
            "tapir: new private key (public key {}): sessions start again",
            tunnel.public_key()
        );
    }
    changed
}

/// The reply to a change (`set=1`, a reload's), made on the tunnel's own
/// thread. Statuses (`get=1`, `tapir-get=1`) are answered there a slice of
/// peers at a time, between packets (`get_head`, `get_peers`), not here.
pub fn answer(request: Request, tunnel: &mut Tunnel, iface: Interface<'_>) -> String {
    let listen_port = iface.listen_port;
    match request {
        Request::Get | Request::TapirGet => format!("errno={EINVAL}\n\n"),
        Request::Set(request) => {
            let own = tunnel.public_key();
            let rebind = iface.rebind;
            let result = apply_set(tunnel, Some(own), &request, &mut |s| {
                if s.clear_key {
                    // No key at all: a running tunnel keeps one (tapir down).
                    return Err(EOPNOTSUPP);
                }
                // Another port: moved there before anything else changes,
                // so that a port taken changes nothing. Port 0 from `wg set
                // listen-port 0` moves to one at random, as the kernel's;
                // from a whole file without ListenPort (`wg setconf`, `wg
                // syncconf`) it keeps the one the tunnel has, where the
                // kernel module would move to another at random, and its
                // peers would have to find it again.
                match s.listen_port {
                    Some(0) if !s.whole_config() => rebind(0),
                    Some(p) if p != 0 && p != listen_port => rebind(p),
                    _ => Ok(()),
                }
            });
            // A new key: the peer that has it went in the set (see
            // `apply_set`), sessions go now (see `Tunnel::set_private_key`).
            if let Ok(Some(k)) = result.as_ref().map(|s| s.private_key.clone()) {
                new_key(tunnel, k);
            }
            let errno = match result {
                Ok(s) => match s.fwmark {
                    Some(m) if m != *iface.fwmark => match (iface.mark)(m) {
                        Ok(()) => {
                            *iface.fwmark = m;
                            0
                        }
                        Err(e) => e.raw_os_error().unwrap_or(EINVAL),
                    },
                    _ => 0,
                },
                Err(e) => e,
            };
            format!("errno={errno}\n\n")
        }
        Request::Apply(r) => {
            let Reapply {
                peers,
                private_key,
                listen_port: port,
                ..
            } = *r;
            // The port first, as `wg syncconf` sets it: one that cannot be
            // taken is said (the reload goes on, and the next one tries again).
            let mut out = String::new();
            if let Some(p) = port.filter(|&p| p != 0 && p != listen_port) {
                match (iface.rebind)(p) {
                    Ok(()) => out += &format!("tapir_listen_port={p}\n"),
                    Err(e) => out += &format!("tapir_listen_port_errno={e}\n"),
                }
            }
            // The key before the peers: a peer that has it goes (see
            // `Tunnel::set_private_key`), and sessions start again.
            if new_key(tunnel, private_key) {
                out += "tapir_private_key=changed\n";
            }
            let d = crate::tunnel::reload::apply(tunnel, peers);
            format!(
                "tapir_added={}\ntapir_removed={}\ntapir_changed={}\n{out}errno=0\n\n",
                d.added, d.removed, d.changed
            )
        }
        Request::Reload => format!("errno={EOPNOTSUPP}\n\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_directory_must_be_ours_and_closed_and_the_socket_is_0600() {
        let base = std::env::temp_dir().join(format!("tapir-uapi-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let dir = base.join("wireguard");
        let host = crate::scope::Scope::fake(1, true);
        let (c, notes) = ControlSocket::bind_in(&dir, &host, "tq0").unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o755);
        assert_eq!(mode(&dir.join("tq0.sock")), 0o600);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no staging left"
        );
        // Our own end, seen through SO_PEERCRED.
        let s = UnixStream::connect(dir.join("tq0.sock")).unwrap();
        assert_eq!(peer_pid(&s), Some(std::process::id() as i32));
        drop(c);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = ControlSocket::bind_in(&dir, &host, "tq0").unwrap_err();
        assert!(
            e.contains("writable by group or others") && e.contains("chmod 755"),
            "{e}"
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::remove_dir(&dir).unwrap();
        std::os::unix::fs::symlink("/tmp", &dir).unwrap();
        let e = ControlSocket::bind_in(&dir, &host, "tq0").unwrap_err();
        assert!(e.contains("not a directory"), "{e}");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn another_namespace_gets_its_own_socket_and_wg_a_link_while_the_name_is_free() {
        let base = std::env::temp_dir().join(format!("tapir-uapi-ns-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let dir = base.join("wireguard");
        let (one, two) = (
            crate::scope::Scope::fake(111, false),
            crate::scope::Scope::fake(222, false),
        );
        let (a, notes) = ControlSocket::bind_in(&dir, &one, "tq1").unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        let own = dir.join("netns-111/tq1.sock");
        let wg = dir.join("tq1.sock");
        assert!(answers(&own) && answers(&wg), "both names reach it");
        // The same name in a second namespace: its own socket, no link.
        let (b, notes) = ControlSocket::bind_in(&dir, &two, "tq1").unwrap();
        assert!(answers(&dir.join("netns-222/tq1.sock")));
        assert!(
            notes.len() == 1 && notes[0].contains("another network namespace"),
            "{notes:?}"
        );
        // A second tunnel of that name in the first namespace: refused.
        let e = ControlSocket::bind_in(&dir, &one, "tq1").unwrap_err();
        assert!(e.contains("already runs in this network namespace"), "{e}");
        drop(b);
        assert!(answers(&wg), "the other's going leaves the first's link");
        drop(a);
        assert!(!own.exists() && !wg.exists(), "both names gone");
        assert!(
            !dir.join("netns-111").exists() && !dir.join("netns-222").exists(),
            "the namespaces' directories went with their last socket"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn the_hosts_tunnel_takes_its_usual_path_back_from_another_namespaces_link() {
        let base = std::env::temp_dir().join(format!("tapir-uapi-host-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let dir = base.join("wireguard");
        // A tunnel tq2 in another namespace links the usual path first.
        let other = crate::scope::Scope::fake(111, false);
        let (a, _) = ControlSocket::bind_in(&dir, &other, "tq2").unwrap();
        let wg = dir.join("tq2.sock");
        assert!(answers(&wg));
        // The host's tq2 (its namespace is not this process's, so the
        // process answering there is in another): it takes the path.
        let host = crate::scope::Scope::fake(1, true);
        let (h, notes) = ControlSocket::bind_in(&dir, &host, "tq2").unwrap();
        assert!(
            notes.len() == 1 && notes[0].contains("another network namespace"),
            "{notes:?}"
        );
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(&wg).unwrap().ino(),
            h.ino,
            "the path is the host's socket"
        );
        assert!(
            answers(&dir.join("netns-111/tq2.sock")),
            "the other keeps its own"
        );
        drop(a);
        assert!(answers(&wg), "the other's going leaves the host's socket");
        // A second host tunnel of that name, where the one answering is in
        // the same namespace: refused, as before.
        let same = crate::scope::Scope::fake(tapir_sys::netns::current().unwrap(), true);
        let e = ControlSocket::bind_in(&dir, &same, "tq2").unwrap_err();
        assert!(e.contains("already runs in this network namespace"), "{e}");
        drop(h);
        assert!(!wg.exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn the_usual_path_goes_to_another_namespaces_tunnel_of_the_name_when_its_holder_goes() {
        use std::os::unix::fs::MetadataExt;
        let base = std::env::temp_dir().join(format!("tapir-uapi-hand-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let dir = base.join("wireguard");
        let (first, _) =
            ControlSocket::bind_in(&dir, &crate::scope::Scope::fake(111, false), "tq3").unwrap();
        let (second, notes) =
            ControlSocket::bind_in(&dir, &crate::scope::Scope::fake(112, false), "tq3").unwrap();
        assert!(
            notes
                .iter()
                .any(|n| n.contains("reach the tunnel of that name in another")),
            "{notes:?}"
        );
        let wg = dir.join("tq3.sock");
        assert_eq!(std::fs::metadata(&wg).unwrap().ino(), first.ino);
        drop(first);
        assert_eq!(
            std::fs::metadata(&wg).unwrap().ino(),
            second.ino,
            "the name went to the other tunnel"
        );
        drop(second);
        assert!(!wg.exists(), "and with it");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_client_reading_its_reply_slowly_holds_the_connection_no_longer_than_the_deadline() {
        let (server, mut client) = UnixStream::pair().unwrap();
        client.write_all(b"get=1\n\n").unwrap();
        // A reading end that takes 4 KiB every 50 ms: each write of the
        // reply gets somewhere, none waits long.
        let reader = std::thread::spawn(move || {
            let mut got = 0usize;
            let mut buf = [0u8; 4096];
            loop {
                std::thread::sleep(Duration::from_millis(50));
                match client.read(&mut buf) {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got += n,
                }
            }
        });
        let reply = format!("{}errno=0\n\n", "x".repeat(8 << 20));
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = serve_connection(server, &mut |_| reply.clone());
            let _ = done_tx.send(r);
        });
        // It ends at the connection's deadline (2 s), not when 8 MiB at
        // 80 KiB a second would be read (100 s).
        let r = done
            .recv_timeout(DEADLINE * 5)
            .expect("the connection outlived its deadline");
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert!(reader.join().unwrap() < 8 << 20);
    }

    #[test]
    fn a_request_over_the_limits_is_read_to_its_end_and_refused_with_e2big() {
        let (server, mut client) = UnixStream::pair().unwrap();
        let served = std::thread::spawn(move || {
            let mut asked = 0;
            let _ = serve_connection(server, &mut |_| {
                asked += 1;
                "errno=0\n\n".into()
            });
            asked
        });
        // 33 MiB of 4,000-byte lines: past MAX_REQUEST. The client writes
        // it all (no SIGPIPE, no EPIPE) and hears why.
        let line = format!("x={}\n", "a".repeat(3998));
        client.write_all(b"set=1\n").unwrap();
        let mut sent = 0;
        while sent <= MAX_REQUEST + (1 << 20) {
            client.write_all(line.as_bytes()).unwrap();
            sent += line.len();
        }
        client.write_all(b"\nget=1\n\n").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut reply = String::new();
        client.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("errno=-7\n\n"), "{reply:.60}");
        assert_eq!(served.join().unwrap(), 1, "only the get was answered");
    }

    #[test]
    fn a_line_that_is_no_line_of_the_protocol_is_answered_before_the_close() {
        // Not UTF-8, and one line of 1 MiB: each heard nothing (a close, or
        // a reset) where an over-long request hears E2BIG.
        for (input, want) in [
            (b"set=1\n\xff\xfe=\xff\n\n".to_vec(), "errno=-71\n\n"),
            (
                [
                    b"set=1\npublic_key=".to_vec(),
                    vec![b'a'; 1 << 20],
                    b"\n\n".to_vec(),
                ]
                .concat(),
                "errno=-7\n\n",
            ),
        ] {
            let (server, mut client) = UnixStream::pair().unwrap();
            let served = std::thread::spawn(move || {
                let _ = serve_connection(server, &mut |_| "errno=0\n\n".into());
            });
            client.write_all(&input).unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
            let mut reply = String::new();
            client.read_to_string(&mut reply).unwrap();
            assert_eq!(reply, want);
            served.join().unwrap();
        }
    }

    fn tunnel() -> (Tunnel, PrivateKey, PublicKey) {
        let key = PrivateKey::from_random([1; 32]);
        let peer = PrivateKey::from_random([2; 32]).public_key();
        let t = Tunnel::new(
            key.clone(),
            vec![PeerConfig {
                public: peer,
                psk: None,
                endpoint: Some("192.0.2.2:51820".parse().unwrap()),
                allowed_ips: vec!["10.0.0.2/32".parse().unwrap()],
                keepalive: Some(Duration::from_secs(25)),
                rate: None,
            }],
        );
        (t, key, peer)
    }

    #[test]
    fn get_lists_interface_and_peers() {
        let (t, key, peer) = tunnel();
        let text = get(&t, &key, 51820);
        assert!(text.starts_with(&format!(
            "private_key={}\nlisten_port=51820\n",
            key.to_hex()
        )));
        assert!(text.contains(&format!("public_key={}\n", peer.to_hex())));
        assert!(text.contains("endpoint=192.0.2.2:51820\n"));
        assert!(text.contains("persistent_keepalive_interval=25\n"));
        assert!(text.contains("allowed_ip=10.0.0.2/32\n"));
        assert!(text.ends_with("errno=0\n\n"));
    }

    /// As the kernel and wireguard-go: allowed IPs without their host bits
    /// (wg-quick routes what `wg show` says, and `ip route` refuses
    /// 10.1.0.5/24); `replace_peers` (wg setconf) makes every peer afresh,
    /// keeping nothing the file leaves out; a set's errno negative.
    #[test]
    fn set_as_the_kernel_sets() {
        let (mut t, key, peer) = tunnel();
        let lines = [
            format!("public_key={}", peer.to_hex()),
            format!("preshared_key={}", "11".repeat(32)),
            "allowed_ip=10.1.0.5/24".into(),
        ];
        set(&mut t, &key, 51820, &lines).unwrap();
        let text = get(&t, &key, 51820);
        assert!(text.contains("allowed_ip=10.1.0.0/24\n"), "{text}");
        assert!(text.contains(&format!("preshared_key={}", "11".repeat(32))));
        // setconf of a file that names the peer without key, endpoint or keepalive.
        let lines = [
            "replace_peers=true".to_string(),
            format!("public_key={}", peer.to_hex()),
            "allowed_ip=10.0.0.2/32".into(),
        ];
        set(&mut t, &key, 51820, &lines).unwrap();
        let text = get(&t, &key, 51820);
        assert!(
            !text.contains("preshared_key=")
                && !text.contains("endpoint=")
                && text.contains("persistent_keepalive_interval=0\n")
                && !text.contains("10.1.0.0/24"),
            "{text}"
        );
        assert_eq!(set_errno("errno=98\n\n".into()), "errno=-98\n\n");
        assert_eq!(set_errno("errno=0\n\n".into()), "errno=0\n\n");
    }

    /// Link-local endpoints with their zone, by number or by name as `wg
    /// showconf` writes them (set refused them: "Unknown error -22").
    #[test]
    fn link_local_endpoints_keep_their_zone() {
        let scope = |t: &str| match scoped_endpoint(t) {
            Some(SocketAddr::V6(a)) => Some(a.scope_id()),
            _ => None,
        };
        assert_eq!(scope("[fe80::1%7]:51820"), Some(7));
        assert_eq!(scope("[fe80::1%lo]:51820"), Some(1), "lo is index 1");
        assert_eq!(scope("[fe80::1%nosuch0]:51820"), None);
        assert_eq!(scope("[fe80::1%lo]:x"), None);
        let (mut t, key, peer) = tunnel();
        let lines = [
            format!("public_key={}", peer.to_hex()),
            "endpoint=[fe80::e032:28ff:fe1e:4e26%lo]:51831".into(),
        ];
        set(&mut t, &key, 51820, &lines).unwrap();
        let (_, live, _) = t.peers().next().unwrap();
        assert_eq!(live, scoped_endpoint("[fe80::e032:28ff:fe1e:4e26%1]:51831"));
    }

    #[test]
    fn set_refuses_keys_of_small_order_and_our_own() {
        let (mut t, key, _) = tunnel();
        for bad in [
            "0000000000000000000000000000000000000000000000000000000000000000".to_string(),
            "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b880".to_string(),
            key.public_key().to_hex(),
        ] {
            let lines = [format!("public_key={bad}"), "allowed_ip=10.9.0.1/32".into()];
            assert_eq!(set(&mut t, &key, 51820, &lines), Err(EINVAL), "{bad}");
        }
        assert_eq!(t.peers().count(), 1, "nothing applied");
    }

    #[test]
    fn set_adds_updates_and_removes_peers() {
        let (mut t, key, peer) = tunnel();
        let other = PrivateKey::from_random([3; 32]).public_key();
        let lines: Vec<String> = [
            format!("public_key={}", other.to_hex()),
            "endpoint=[2001:db8::1]:51820".into(),
            "allowed_ip=10.0.0.3/32".into(),
            "allowed_ip=fd00::3/128".into(),
            format!("public_key={}", peer.to_hex()),
            "replace_allowed_ips=true".into(),
            "allowed_ip=10.0.0.22/32".into(),
        ]
        .into();
        set(&mut t, &key, 51820, &lines).unwrap();
        let text = get(&t, &key, 51820);
        assert!(text.contains(&format!("public_key={}", other.to_hex())));
        assert!(text.contains("endpoint=[2001:db8::1]:51820"));
        assert!(text.contains("allowed_ip=fd00::3/128"));
        assert!(
            text.contains("allowed_ip=10.0.0.22/32") && !text.contains("allowed_ip=10.0.0.2/32")
        );
        set(
            &mut t,
            &key,
            51820,
            &[
                format!("public_key={}", other.to_hex()),
                "remove=true".into(),
            ],
        )
        .unwrap();
        assert!(!get(&t, &key, 51820).contains(&other.to_hex()));
        // Refused as a whole: bad values, keys before any peer, a new listen port.
        assert_eq!(
            set(&mut t, &key, 51820, &["allowed_ip=10.0.0.9/32".into()]),
            Err(EPROTO)
        );
        assert_eq!(
            set(
                &mut t,
                &key,
                51820,
                &[
                    format!("public_key={}", peer.to_hex()),
                    "endpoint=nowhere".into()
                ]
            ),
            Err(EINVAL)
        );
        assert_eq!(
            set(&mut t, &key, 51820, &["listen_port=1".into()]),
            Err(EOPNOTSUPP)
        );
        assert_eq!(
            set(&mut t, &key, 51820, &["public_key=zz".into()]),
            Err(EINVAL)
        );
    }

    #[test]
    fn the_status_view_carries_no_key() {
        let (mut t, key, peer) = tunnel();
        let psk = "42".repeat(32);
        let lines = [
            format!("public_key={}", peer.to_hex()),
            format!("preshared_key={psk}"),
        ];
        set(&mut t, &key, 51820, &lines).unwrap();
        let wg = get_with(&t, Some(&key), 51820, 0, true);
        assert!(
            wg.contains(&*key.to_hex()) && wg.contains(&psk),
            "wg gets what showconf needs"
        );
        let status = get_with(&t, Some(&key), 51820, 0, false);
        assert!(
            !status.contains(&*key.to_hex()) && !status.contains(&psk),
            "{status}"
        );
        assert!(status.contains(&format!("tapir_public_key={}\n", key.public_key().to_hex())));
        assert!(status.contains(&format!("public_key={}\n", peer.to_hex())));
    }

    #[test]
    fn a_new_key_takes_the_place_of_a_peer_that_had_it() {
        // As wireguard-go: the interface cannot be its own peer, whichever
        // came first (the wg-quick engine takes its key after its peers).
        let (mut t, _, _) = tunnel();
        let new = PrivateKey::from_random([9; 32]);
        let lines = [format!("public_key={}", new.public_key().to_hex())];
        apply_set(&mut t, None, &parse_set(&lines).unwrap(), &mut |_| Ok(())).unwrap();
        assert_eq!(t.peers().count(), 2);
        let lines = [format!("private_key={}", &*new.to_hex())];
        let s = apply_set(&mut t, None, &parse_set(&lines).unwrap(), &mut |_| Ok(())).unwrap();
        assert!(s.private_key.is_some());
        assert_eq!(t.peers().count(), 1, "the peer with the new key is gone");
        // And with the key known, a peer with it is refused.
        let lines = [format!("public_key={}", new.public_key().to_hex())];
        let own = Some(new.public_key());
        assert_eq!(
            apply_set(&mut t, own, &parse_set(&lines).unwrap(), &mut |_| Ok(())).map(|_| ()),
            Err(EINVAL)
        );
    }

    #[test]
    fn a_setconf_of_many_peers_is_read_apart_from_the_tunnel_and_replaces_them() {
        // `wg setconf` of 10,000 peers: read and checked without the tunnel
        // (the control thread's part), then applied by key look-ups.
        let (mut t, key, old) = tunnel();
        let mut lines = vec!["replace_peers=true".to_string()];
        let keys: Vec<PublicKey> = (0..10_000u32)
            .map(|i| {
                let mut b = [7u8; 32];
                b[1..5].copy_from_slice(&i.to_le_bytes());
                PrivateKey::from_random(b).public_key()
            })
            .collect();
        for (i, k) in keys.iter().enumerate() {
            lines.push(format!("public_key={}", k.to_hex()));
            lines.push(format!("allowed_ip=10.{}.{}.1/32", i / 256, i % 256));
        }
        let request = parse_set(&lines).unwrap();
        assert_eq!(format!("{request:?}"), "SetRequest(10000 peer change(s))");
        apply_set(&mut t, Some(key.public_key()), &request, &mut |_| Ok(())).unwrap();
        assert_eq!(t.peers().count(), 10_000);
        assert!(t.peer_index(&old).is_none(), "replaced");
        assert!(keys.iter().all(|k| t.peer_index(k).is_some()));
        // Replaced again by one peer: 10,000 removals in one rebuild.
        let lines = [
            "replace_peers=true".to_string(),
            format!("public_key={}", old.to_hex()),
            "allowed_ip=10.0.0.2/32".into(),
        ];
        apply_set(
            &mut t,
            Some(key.public_key()),
            &parse_set(&lines).unwrap(),
            &mut |_| Ok(()),
        )
        .unwrap();
        assert_eq!(t.peers().count(), 1);
        assert!(t.peer_index(&old).is_some());
    }

    /// A change that changes nothing is left undone (a `wg syncconf` of an
    /// unchanged file), and any difference is a change: each field alone,
    /// allowed IPs in another order, a duplicate, an endpoint the peer
    /// roamed away from.
    #[test]
    fn a_change_that_changes_nothing_is_told_from_every_change() {
        let (mut t, _, peer) = tunnel();
        let psk = PresharedKey::from_random([9; 32]);
        t.update_peer(&peer, |c| {
            c.psk = Some(psk.clone());
            c.allowed_ips.push("10.0.1.0/24".parse().unwrap());
        });
        let same = PeerChange {
            public: peer,
            remove: false,
            update_only: false,
            psk: Some(psk.clone()),
            endpoint: Some("192.0.2.2:51820".parse().unwrap()),
            keepalive: Some(25),
            replace_allowed_ips: true,
            allowed_ips: vec![
                "10.0.0.2/32".parse().unwrap(),
                "10.0.1.0/24".parse().unwrap(),
            ],
        };
        let with = |f: &dyn Fn(&mut PeerChange)| {
            let mut c = same.clone();
            f(&mut c);
            c
        };
        let nothing = [
            same.clone(),
            with(&|c| c.psk = None),
            with(&|c| c.endpoint = None),
            with(&|c| c.keepalive = None),
            with(&|c| c.allowed_ips.push("10.0.0.2/32".parse().unwrap())),
            with(&|c| (c.replace_allowed_ips, c.allowed_ips) = (false, vec![])),
            with(&|c| {
                c.replace_allowed_ips = false;
                c.allowed_ips.truncate(1);
            }),
        ];
        for c in &nothing {
            assert!(changes_nothing(&t, c));
        }
        let changes = [
            with(&|c| c.psk = Some(PresharedKey::from_random([8; 32]))),
            with(&|c| c.psk = Some(PresharedKey::from_random([0; 32]))),
            with(&|c| c.endpoint = Some("192.0.2.3:51820".parse().unwrap())),
            with(&|c| c.keepalive = Some(0)),
            with(&|c| c.keepalive = Some(26)),
            with(&|c| c.allowed_ips.reverse()),
            with(&|c| c.allowed_ips.pop().map(|_| ()).unwrap_or(())),
            with(&|c| c.allowed_ips.push("10.0.2.0/24".parse().unwrap())),
            with(&|c| c.allowed_ips = vec![]),
            with(&|c| {
                c.replace_allowed_ips = false;
                c.allowed_ips = vec!["10.0.2.0/24".parse().unwrap()];
            }),
            with(&|c| c.public = PrivateKey::from_random([5; 32]).public_key()),
        ];
        for (i, c) in changes.iter().enumerate() {
            assert!(!changes_nothing(&t, c), "change {i}");
            // And each does change the peer when applied.
            let mut u = tunnel().0;
            u.update_peer(&peer, |p| {
                p.psk = Some(psk.clone());
                p.allowed_ips.push("10.0.1.0/24".parse().unwrap());
            });
            let before = get(&u, &PrivateKey::from_random([1; 32]), 51820);
            apply(&mut u, c);
            assert_ne!(
                get(&u, &PrivateKey::from_random([1; 32]), 51820),
                before,
                "change {i}"
            );
        }
        // The peer roams (answers a handshake from another address): its
        // configured endpoint given again is a change (sent there now).
        let (mut t, _, peer) = tunnel();
        let mut u = Tunnel::new(
            PrivateKey::from_random([2; 32]),
            vec![PeerConfig {
                public: PrivateKey::from_random([1; 32]).public_key(),
                psk: None,
                endpoint: None,
                allowed_ips: vec!["10.0.0.1/32".parse().unwrap()],
                keepalive: None,
                rate: None,
            }],
        );
        let (now, wall) = (
            std::time::Instant::now(),
            Duration::from_secs(1_700_000_000),
        );
        let mut rng = super::super::OsRandom::new().unwrap();
        let mut buf = vec![0u8; 2048];
        // An IPv4 header alone, 10.0.0.1 to 10.0.0.2.
        let ip = [
            0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        buf[16..36].copy_from_slice(&ip);
        t.encapsulate(now, wall, &mut rng, &mut buf, 20);
        let (_, n) = t.poll_transmit(now, &mut buf).expect("an initiation");
        u.decapsulate(
            now,
            wall,
            &mut rng,
            "192.0.2.1:51820".parse().unwrap(),
            &mut buf,
            n,
        );
        let (_, n) = u.poll_transmit(now, &mut buf).expect("a response");
        let elsewhere: SocketAddr = "192.0.2.9:51820".parse().unwrap();
        t.decapsulate(now, wall, &mut rng, elsewhere, &mut buf, n);
        let configured = "192.0.2.2:51820".parse().unwrap();
        assert_eq!(
            t.peer_config(&peer).map(|(c, at)| (c.endpoint, at)),
            Some((Some(configured), Some(elsewhere))),
            "roamed"
        );
        let given = |e: SocketAddr| PeerChange {
            endpoint: Some(e),
            psk: None,
            keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: vec![],
            ..same.clone()
        };
        assert!(!changes_nothing(&t, &given(configured)));
        assert!(!changes_nothing(&t, &given(elsewhere)), "not configured");
        apply(&mut t, &given(configured));
        assert!(changes_nothing(&t, &given(configured)));
    }

    #[test]
    fn changes_apply_in_order_around_a_removal() {
        let (mut t, key, peer) = tunnel();
        let own = Some(key.public_key());
        // Removed, then given again: added afresh with what follows.
        let lines = [
            format!("public_key={}", peer.to_hex()),
            "remove=true".into(),
            format!("public_key={}", peer.to_hex()),
            "allowed_ip=10.0.0.7/32".into(),
        ];
        apply_set(&mut t, own, &parse_set(&lines).unwrap(), &mut |_| Ok(())).unwrap();
        let text = get(&t, &key, 51820);
        assert!(
            text.contains("allowed_ip=10.0.0.7/32") && !text.contains("allowed_ip=10.0.0.2/32"),
            "{text}"
        );
        // Given, then removed: gone.
        let lines = [
            format!("public_key={}", peer.to_hex()),
            "allowed_ip=10.0.0.8/32".into(),
            format!("public_key={}", peer.to_hex()),
            "remove=true".into(),
        ];
        apply_set(&mut t, own, &parse_set(&lines).unwrap(), &mut |_| Ok(())).unwrap();
        assert_eq!(t.peers().count(), 0);
    }
}
