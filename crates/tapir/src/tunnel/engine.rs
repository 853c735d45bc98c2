//! `tapir wireguard-go [-f] IFNAME`: tapir as the userspace implementation
//! that stock `wg-quick` runs when the kernel has no WireGuard module
//! (`WG_QUICK_USERSPACE_IMPLEMENTATION`), behaving as `wireguard-go IFNAME`:
//!
//! ```text
//!   wireguard-go wg0 ─▶ (daemon) tun wg0 created, /var/run/wireguard/wg0.sock served
//!                    ─▶ parent returns once the socket answers (WG_PROCESS_FOREGROUND=1: no daemon)
//!   wg setconf wg0   ─▶ private_key, listen_port, fwmark, peers ─▶ the datapath starts
//!   ip address/link/route, wg set wg0 fwmark ...                ─▶ applied as they come
//!   ip link del wg0  ─▶ the device is gone ─▶ the daemon ends, its socket with it
//! ```
//! Until a private key is set the tunnel has no datapath: `wg show` lists
//! its port and peers, and nothing is sent or accepted.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tapir_proto::wg::keys::PrivateKey;
use tapir_proto::wg::tunnel::{Layer, Tunnel};
use tapir_sys::{IfName, Mode, Netlink};

use super::{Net, Started, bind_udp, create_device, ops};
use crate::config::{Ops, Transport, TunnelConfig};
use crate::dev::DevError;
use crate::uapi::{self, ControlSocket, Request};

/// Whether wireguard-go's environment asks for the foreground.
pub fn foreground_from_env() -> bool {
    std::env::var("WG_PROCESS_FOREGROUND").is_ok_and(|v| v == "1")
}

/// Starts `tapir wireguard-go --foreground NAME` in the background, its
/// output in `log`, and returns once its control socket answers.
pub fn daemonize(tapir: &Path, name: &IfName, tun_path: &Path, log: &Path) -> Result<(), String> {
    if let Some(dir) = log.parent() {
        crate::uapi::ensure_private_dir(dir)?;
    }
    let mut cmd = Command::new(tapir);
    cmd.args(["wireguard-go", "--foreground", "--tun-path"])
        .arg(tun_path)
        .arg(name.as_str());
    let (mut child, start) = crate::service::spawn_daemon(cmd, log)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            return Err(format!(
                "{name} did not come up ({status}): {}",
                text.get(start as usize..).unwrap_or("").trim()
            ));
        }
        if crate::service::query(name.as_str()).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(format!(
                "{name} did not answer within 15 s; see {}",
                log.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// What `wg setconf` has said so far, before the tunnel has a key.
struct Pending {
    /// Peers kept in a tunnel of a placeholder key (never used: no datapath runs).
    tunnel: Tunnel,
    key: Option<PrivateKey>,
    port: u16,
    fwmark: u32,
}

/// Runs the interface `name` in the foreground until `shutdown` or until
/// its device is deleted (`ip link del`, as `wg-quick down` does).
pub fn run(name: &IfName, tun_path: &Path, shutdown: &AtomicBool) -> Result<(), DevError> {
    if !crate::caps::has_net_admin() {
        return Err(DevError::Permission(crate::caps::net_admin_missing(
            "running a tunnel",
        )));
    }
    let mut nl = Netlink::open()?;
    if nl.link(name.as_str())?.is_some() {
        return Err(DevError::Invalid(format!(
            "{name} already exists: remove it first (ip link del {name})"
        )));
    }
    let (dev, _index) = create_device(&mut nl, tun_path, name, Mode::Tun)?;
    let (control, notes) = ControlSocket::bind(name.as_str())
        .map_err(|e| DevError::Runtime(format!("{name}: {e}")))?;
    for n in notes {
        eprintln!("tapir: {name}: warning: {n}");
    }
    eprintln!("tapir: {name}: created, waiting for a private key (wg setconf {name} FILE)");
    let placeholder = PrivateKey::from_random(
        super::random32()
            .map_err(|e| DevError::Runtime(format!("randomness from the kernel: {e}")))?,
    );
    let pending = RefCell::new(Pending {
        tunnel: Tunnel::with_layer(
            placeholder,
            Vec::new(),
            Layer::Ip,
            tapir_proto::switch::DEFAULT_AGING,
            tapir_proto::switch::DEFAULT_CAP,
        ),
        key: None,
        port: 0,
        fwmark: 0,
    });
    let keyed = Cell::new(false);
    let gone = Cell::new(false);
    {
        let mut answer = |request: Request, reply: uapi::Reply| {
            let mut p = pending.borrow_mut();
            let p = &mut *p;
            reply.send(match request {
                Request::Get => uapi::get_with(&p.tunnel, p.key.as_ref(), p.port, p.fwmark, true),
                Request::TapirGet => {
                    uapi::get_with(&p.tunnel, p.key.as_ref(), p.port, p.fwmark, false)
                }
                Request::Set(request) => {
                    let own = p.key.as_ref().map(PrivateKey::public_key);
                    match uapi::apply_set(&mut p.tunnel, own, &request, &mut |_| Ok(())) {
                        Ok(s) => {
                            if s.clear_key {
                                p.key = None;
                            }
                            if let Some(k) = s.private_key {
                                p.key = Some(k);
                            }
                            if let Some(port) = s.listen_port {
                                p.port = port;
                            }
                            if let Some(m) = s.fwmark {
                                p.fwmark = m;
                            }
                            keyed.set(p.key.is_some());
                            "errno=0\n\n".into()
                        }
                        Err(e) => format!("errno={e}\n\n"),
                    }
                }
                Request::Reload | Request::Apply(_) => "errno=95\n\n".into(),
            })
        };
        let mut idle = || {
            // The device deleted before it got a key.
            if matches!(nl.link(name.as_str()), Ok(None)) {
                gone.set(true);
            }
        };
        let stop = || keyed.get() || gone.get() || shutdown.load(Ordering::Relaxed);
        // Until keyed: a look for the device every 250 ms (a short phase).
        control.run(
            &stop,
            None,
            Some(Duration::from_millis(250)),
            &mut answer,
            &mut idle,
        );
    }
    if !keyed.get() {
        eprintln!("tapir: {name}: down");
        return Ok(());
    }
    let p = pending.into_inner();
    let key = p.key.expect("keyed");
    let peers: Vec<_> = p.tunnel.peers().map(|(c, _, _)| c.clone()).collect();
    let socket = bind_udp(p.port)?;
    let port = socket.local_addr().map(|a| a.port()).unwrap_or(0);
    if p.fwmark != 0 {
        socket2::SockRef::from(&socket)
            .set_mark(p.fwmark)
            .map_err(|e| DevError::Runtime(format!("{name}: marking the socket: {e}")))?;
    }
    let tunnel = Tunnel::with_layer(
        key.clone(),
        peers,
        Layer::Ip,
        tapir_proto::switch::DEFAULT_AGING,
        tapir_proto::switch::DEFAULT_CAP,
    );
    eprintln!(
        "tapir: {name}: up, public key {}, listening on UDP port {port}, {} peer(s)",
        key.public_key(),
        tunnel.peer_count()
    );
    let config = TunnelConfig {
        file: PathBuf::from(format!("(wg setconf {name})")),
        name: name.clone(),
        private_key: key.clone(),
        listen_port: Some(port),
        addresses: Vec::new(),
        mtu: crate::config::DEFAULT_MTU,
        // (wg-quick sets the device's itself.)
        mtu_auto: false,
        mode: Mode::Tun,
        mac: None,
        bridge: None,
        transport: Transport::Udp,
        routes: Some(Vec::new()),
        peers: Vec::new(),
        warnings: Vec::new(),
        ops: Ops {
            fwmark: (p.fwmark != 0).then_some(p.fwmark),
            ..Ops::default()
        },
    };
    let started = Started {
        name: name.clone(),
        dev,
        mode: Mode::Tun,
        net: Net::Udp(socket),
        tunnel,
        control: Some(control),
        port,
        hostnames: Vec::new(),
        bridge: None,
        applied: ops::Applied::new(name.as_str(), &config.ops, PathBuf::new(), "udp"),
        save_to: None,
        config,
    };
    // Set up (wg-quick configures addresses and routes itself): from here
    // on, CAP_NET_ADMIN and CAP_NET_BIND_SERVICE alone, for `wg set fwmark`
    // and `wg set listen-port 443`.
    super::keep_only_network();
    // No file to read again: nothing to reload.
    let reloads = std::sync::atomic::AtomicU64::new(0);
    // SIGINT and SIGTERM wake the threads (which sleep until there is work).
    let bell = std::sync::Arc::new(
        super::bell::Bell::new()
            .map_err(|e| DevError::Runtime(format!("{name}: a wake-up socket: {e}")))?,
    );
    let _rings = super::bell::ring_on_signals(
        &bell,
        &[signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM],
    )
    .map_err(|e| DevError::Runtime(format!("{name}: installing a signal handler: {e}")))?;
    crate::notify::send("READY=1");
    match started.run(shutdown, &reloads, bell) {
        // `wg-quick down` deletes the device: that is the end, not a failure.
        Err(DevError::Runtime(e)) if e.contains("went away") || e.contains("(os error 77)") => {
            eprintln!("tapir: {name}: the device was deleted: down");
            Ok(())
        }
        other => other,
    }
}
