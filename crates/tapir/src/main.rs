//! The `tapir` command line: flags are parsed and validated here, then handed
//! to the library. Data goes to stdout; errors go to stderr with a hint and a
//! non-zero exit status.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use tapir::dev::{self, AddRequest, Added, SetRequest};

use tapir::doctor;
use tapir_sys::Mode;

/// tapir: TUN/TAP devices, packets and tunnels.
#[derive(Parser, Debug)]
#[command(name = "tapir", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the tun clone device is (for the commands that open it).
#[derive(clap::Args, Debug)]
struct TunArgs {
    /// The tun clone device.
    #[arg(long, env = "TAPIR_TUN_PATH", default_value = tapir_sys::DEFAULT_TUN_PATH)]
    tun_path: PathBuf,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once per run
enum Command {
    /// Check what the kernel and this process can do, and how to fix what is missing.
    Doctor {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        tun: TunArgs,
    },
    /// Create, delete, list, show and configure tun/tap devices.
    #[command(subcommand)]
    Dev(DevCommand),
    /// Answer pings on a tun/tap device (and ARP and neighbour discovery on tap).
    Echo {
        /// The device; created (and removed on exit) if it does not exist.
        name: String,
        /// tun or tap, for a device to create (default tun); must match an existing one.
        #[arg(long, value_parser = mode_parser())]
        mode: Option<Mode>,
        /// The host's address on the device (CIDR; repeatable, e.g. one IPv4 and one IPv6).
        #[arg(long = "addr", value_name = "CIDR")]
        addrs: Vec<String>,
        /// Answer only for this address (repeatable); default: all served addresses.
        #[arg(long, value_name = "ADDR")]
        only: Vec<String>,
        /// Record requests and replies to a pcap file.
        #[arg(long, value_name = "FILE")]
        pcap: Option<PathBuf>,
        /// Our MAC address in tap mode (default: a random locally administered one).
        #[arg(long)]
        mac: Option<String>,
        #[command(flatten)]
        tun: TunArgs,
    },
    /// Run tunnels in the foreground: a wg-quick file (NAME.conf gives interface NAME) or a tapir TOML file (*.toml).
    Run {
        /// The config file; a name alone (wg0) is ./wg0.conf or ./wg0.toml, else /etc/tapir/wg0.conf or .toml (TAPIR_CONFIG_DIR moves it).
        file: PathBuf,
        #[command(flatten)]
        dirs: DirArgs,
        #[command(flatten)]
        tun: TunArgs,
    },
    /// Start the tunnels of a config file in the background; returns once they answer.
    Up {
        /// A wg-quick file (NAME.conf) or a tapir TOML file (*.toml); a name alone (wg0) is ./wg0.conf or ./wg0.toml, else /etc/tapir/wg0.conf or .toml (TAPIR_CONFIG_DIR moves it).
        file: PathBuf,
        #[command(flatten)]
        dirs: DirArgs,
        #[command(flatten)]
        tun: TunArgs,
    },
    /// Stop a tunnel started with up (and every tunnel of its file), taking back everything; or, given a FILE, its tunnels and declared devices.
    Down {
        /// The tunnel (interface) name, or a config file.
        name: String,
        #[command(flatten)]
        dirs: DirArgs,
    },
    /// Apply a changed config file to a running tunnel without dropping anyone (as wg syncconf); also on SIGHUP.
    Reload {
        /// The tunnel (interface) name.
        name: String,
    },
    /// Show this namespace's tunnels (started with up or run): peers, endpoints, handshakes, transfer.
    #[command(
        after_help = "Exit status: 0 when the tunnels asked about run; 3 when one has a record but no longer runs (it crashed: tapir down NAME clears what it left), as systemctl status says of a dead unit; 1 when NAME is not up at all, or on an error."
    )]
    Status {
        /// One tunnel; default: all.
        name: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dirs: DirArgs,
    },
    /// The lab: two namespaces, a tapir tunnel between them, a ping and a throughput figure; all removed after.
    Demo {
        /// Seconds of the throughput measurement (1 to 60).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=60))]
        seconds: u64,
        /// The same lab with the tunnel over TCP (as through a network that blocks UDP).
        #[arg(long)]
        tcp: bool,
        /// The same lab with a tap-mode tunnel (Ethernet frames).
        #[arg(long)]
        tap: bool,
    },
    /// Be wg-quick's userspace WireGuard (as wireguard-go IFNAME): WG_QUICK_USERSPACE_IMPLEMENTATION=tapir-wireguard-go.
    #[command(name = "wireguard-go")]
    WireguardGo {
        /// Stay in the foreground (also WG_PROCESS_FOREGROUND=1).
        #[arg(short, long)]
        foreground: bool,
        /// The interface to create.
        name: String,
        #[command(flatten)]
        tun: TunArgs,
        #[command(flatten)]
        dirs: DirArgs,
    },
    /// QEMU's script=: bring the tap up, on a bridge (created if missing, with --addr on it if given) or with --addr on itself.
    QemuIfup {
        /// The tap QEMU created.
        name: String,
        /// The bridge to put it on.
        #[arg(long, env = "TAPIR_QEMU_BRIDGE")]
        bridge: Option<String>,
        /// The host's address: on a bridge tapir creates, or on the tap without --bridge.
        #[arg(long, env = "TAPIR_QEMU_ADDR")]
        addr: Option<String>,
        #[command(flatten)]
        dirs: DirArgs,
    },
    /// QEMU's downscript=: take the tap off its bridge; a bridge tapir created goes with its last port.
    QemuIfdown {
        /// The tap.
        name: String,
        /// The address qemu-ifup put on the tap (without --bridge): taken off.
        #[arg(long, env = "TAPIR_QEMU_ADDR")]
        addr: Option<String>,
        #[command(flatten)]
        dirs: DirArgs,
    },
    /// Say what the kernel does with an address (route, local, device, holder, tunnel peer) or a device.
    Explain {
        /// An address (10.0.0.2) or a device (tun0).
        what: String,
        /// Print the facts and findings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// A guest network: a bridge, NAT and a DHCP server (libvirt's default network without libvirt).
    #[command(subcommand)]
    GuestNet(GuestNetCommand),
    /// Forwarding and masquerade for a guest subnet (nftables, a table of tapir's own), reversibly.
    #[command(subcommand)]
    Nat(NatCommand),
    /// Print shell completions (source them, or save them where your shell looks).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), or with --dir write it and one page per
    /// subcommand there: tapir man --dir /usr/local/share/man/man1
    Man {
        /// Write tapir.1 and tapir-SUBCOMMAND.1 (the pages tapir.1 names) into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Install the systemd units: tapir@.service (systemctl enable --now tapir@wg0 runs /etc/tapir/wg0.conf or .toml) and tapir-devices.service (/etc/tapir/devices.toml at boot).
    InstallUnits {
        /// Where unit files go.
        #[arg(long, default_value = "/etc/systemd/system")]
        dir: PathBuf,
    },
    /// Print a new private key (base64, as wg genkey).
    Genkey,
    /// Read a private key on stdin, print its public key (as wg pubkey).
    Pubkey,
    /// Print a new preshared key (as wg genpsk).
    Genpsk,
    /// Read a tun/tap device: print a line per packet, optionally record pcap.
    Dump {
        /// The device; a transient one is created if it does not exist.
        name: String,
        /// tun or tap, for a device to create (default tun); must match an existing one.
        #[arg(long, value_parser = mode_parser())]
        mode: Option<Mode>,
        /// Stop after N packets (1 or more).
        #[arg(long, short = 'c', value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
        /// Write the packets to a pcap file (tcpdump -r and Wireshark read it);
        /// `-`: to standard output instead of the lines (| tcpdump -r -).
        #[arg(long, short = 'w', value_name = "FILE")]
        write: Option<PathBuf>,
        /// Bytes of each packet to keep in the pcap file (default: all).
        #[arg(long, short = 's', default_value_t = 0, requires = "write")]
        snaplen: u32,
        #[command(flatten)]
        tun: TunArgs,
    },
}

#[derive(Subcommand, Debug)]
enum GuestNetCommand {
    /// Create bridge NAME with the subnet's first address, NAT out of --out, DHCP for guests.
    Up {
        /// The bridge's name.
        name: String,
        /// The guests' subnet, e.g. 192.168.77.0/24.
        #[arg(long)]
        subnet: String,
        /// NAT out of this interface (e.g. eth0); without it, the guests reach the host only.
        #[arg(long)]
        out: Option<String>,
        /// Name servers to give the guests (default, with --out: the host's,
        /// from /etc/resolv.conf, loopback ones aside).
        #[arg(long, value_delimiter = ',')]
        dns: Vec<std::net::Ipv4Addr>,
        #[command(flatten)]
        dirs: DirArgs,
    },
    /// Take it all back.
    Down {
        /// The bridge's name.
        name: String,
        #[command(flatten)]
        dirs: DirArgs,
    },
    /// The bridge, NAT and DHCP leases.
    Status {
        /// The bridge's name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dirs: DirArgs,
    },
    /// The DHCP server itself, in the foreground (up starts it).
    #[command(hide = true)]
    Serve {
        /// The bridge.
        name: String,
        /// The subnet.
        #[arg(long)]
        subnet: String,
        /// Name servers to give.
        #[arg(long, value_delimiter = ',')]
        dns: Vec<std::net::Ipv4Addr>,
        #[command(flatten)]
        dirs: DirArgs,
    },
}

#[derive(Subcommand, Debug)]
enum NatCommand {
    /// Masquerade SOURCE's traffic out of IFACE and forward it (ip_forward on; its value before remembered).
    Enable {
        /// The guest subnet (CIDR), e.g. 192.168.77.0/24.
        #[arg(long)]
        source: String,
        /// The interface towards the outside, e.g. eth0.
        #[arg(long)]
        out: String,
        #[command(flatten)]
        dirs: DirArgs,
    },
    /// Undo enable (for SOURCE and IFACE, or everything); forwarding goes back to what it was.
    Disable {
        /// The guest subnet (CIDR); with --out, only that entry.
        #[arg(long, requires = "out")]
        source: Option<String>,
        /// The interface towards the outside.
        #[arg(long, requires = "source")]
        out: Option<String>,
        #[command(flatten)]
        dirs: DirArgs,
    },
    /// What is enabled, and whether forwarding is on.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum DevCommand {
    /// Create a persistent tun/tap device (like ip tuntap add).
    Add {
        /// Name, or a template such as tap%d; default: tun%d or tap%d.
        name: Option<String>,
        /// tun (IP packets) or tap (Ethernet frames).
        #[arg(long, value_parser = mode_parser())]
        mode: Mode,
        /// User (name or uid) allowed to open the device without root.
        #[arg(long)]
        user: Option<String>,
        /// Group (name or gid) allowed to open the device without root.
        #[arg(long)]
        group: Option<String>,
        /// Allow several queues (IFF_MULTI_QUEUE).
        #[arg(long)]
        multi_queue: bool,
        /// Prefix packets with a virtio-net header (IFF_VNET_HDR), for offloads.
        #[arg(long)]
        vnet_hdr: bool,
        /// Prefix packets with the 4-byte packet-information header.
        #[arg(long)]
        pi: bool,
        /// Succeed if the device already exists with these settings.
        #[arg(long)]
        exist_ok: bool,
        #[command(flatten)]
        tun: TunArgs,
    },
    /// Delete a tun/tap device (refuses any other kind of device).
    #[command(alias = "delete")]
    Del {
        /// The device.
        name: String,
        /// Delete it even while a program holds it open (it then gets
        /// errors on read and write).
        #[arg(long)]
        force: bool,
    },
    /// List the tun/tap devices of this network namespace.
    #[command(alias = "ls")]
    List {
        /// Print JSON, like ip -j.
        #[arg(long)]
        json: bool,
    },
    /// Show one tun/tap device in detail.
    Show {
        /// The device.
        name: String,
        /// Print JSON, like ip -j.
        #[arg(long)]
        json: bool,
    },
    /// Configure a tun/tap device over netlink; all changes or none.
    Set {
        /// The device.
        name: String,
        /// Bring the link up.
        #[arg(long, conflicts_with = "down")]
        up: bool,
        /// Bring the link down.
        #[arg(long)]
        down: bool,
        /// Set the MTU.
        #[arg(long)]
        mtu: Option<u32>,
        /// Promiscuous mode.
        #[arg(long, value_parser = ["on", "off"])]
        promisc: Option<String>,
        /// Add an address (CIDR; repeatable).
        #[arg(long = "addr", value_name = "CIDR")]
        addrs: Vec<String>,
        /// Peer of the --addr just before (point-to-point).
        #[arg(long = "peer", value_name = "ADDR")]
        peers: Vec<String>,
        /// Remove an address (CIDR; repeatable).
        #[arg(long = "del-addr", value_name = "CIDR")]
        del_addrs: Vec<String>,
        /// Add a route through the device (CIDR or default; repeatable).
        #[arg(long = "route", value_name = "CIDR")]
        routes: Vec<String>,
        /// Gateway of the --route just before.
        #[arg(long = "via", value_name = "ADDR")]
        vias: Vec<String>,
        /// Remove a route through the device (CIDR or default; repeatable).
        #[arg(long = "del-route", value_name = "CIDR")]
        del_routes: Vec<String>,
    },
}

/// Where background tunnels keep their pid and log files.
#[derive(clap::Args, Debug)]
struct DirArgs {
    /// Directory of pid files.
    #[arg(long, env = "TAPIR_RUN_DIR", default_value = "/run/tapir")]
    run_dir: PathBuf,
    /// Directory of log files.
    #[arg(long, env = "TAPIR_LOG_DIR", default_value = "/var/log/tapir")]
    log_dir: PathBuf,
}

impl DirArgs {
    fn dirs(self) -> tapir::service::Dirs {
        tapir::service::Dirs {
            run: self.run_dir,
            log: self.log_dir,
        }
    }
}

/// Pairs each `--peer` (or `--via`) with the `--addr` (or `--route`) right
/// before it on the command line, by argument position. `main` and
/// `secondary` are clap ids (field names); the flags are their singulars.
fn pair_by_position(
    m: &ArgMatches,
    main_id: &str,
    secondary_id: &str,
) -> Result<Vec<(String, Option<String>)>> {
    let main = main_id.trim_end_matches('s');
    let secondary = secondary_id.trim_end_matches('s');
    let mains: Vec<(usize, String)> = match (m.indices_of(main_id), m.get_many::<String>(main_id)) {
        (Some(i), Some(v)) => i.zip(v.cloned()).collect(),
        _ => vec![],
    };
    let mut out: Vec<(String, Option<String>)> =
        mains.iter().map(|(_, v)| (v.clone(), None)).collect();
    if let (Some(idx), Some(vals)) = (
        m.indices_of(secondary_id),
        m.get_many::<String>(secondary_id),
    ) {
        for (i, v) in idx.zip(vals) {
            let Some(slot) = mains.iter().rposition(|(mi, _)| *mi < i) else {
                anyhow::bail!("--{secondary} {v} must follow the --{main} it belongs to");
            };
            if out[slot].1.is_some() {
                anyhow::bail!("--{main} {} has more than one --{secondary}", out[slot].0);
            }
            out[slot].1 = Some(v.clone());
        }
    }
    Ok(out)
}

fn set_request(
    m: &ArgMatches,
    up: bool,
    down: bool,
    mtu: Option<u32>,
    promisc: Option<&str>,
    del_addrs: &[String],
    del_routes: &[String],
) -> Result<SetRequest> {
    let mut req = SetRequest {
        up: if up {
            Some(true)
        } else if down {
            Some(false)
        } else {
            None
        },
        mtu,
        promisc: promisc.map(|p| p == "on"),
        ..SetRequest::default()
    };
    let bad = |e: String| anyhow::anyhow!("{e}; nothing was changed");
    for (addr, peer) in pair_by_position(m, "addrs", "peers")? {
        let net = dev::parse_addr(&addr).map_err(bad)?;
        let peer = peer
            .map(|p| dev::parse_ip(&p, "--peer"))
            .transpose()
            .map_err(bad)?;
        req.add_addrs.push((net, peer));
    }
    for (route, via) in pair_by_position(m, "routes", "vias")? {
        let via = via
            .map(|v| dev::parse_ip(&v, "--via"))
            .transpose()
            .map_err(bad)?;
        let v6 = via.is_some_and(|v| v.is_ipv6());
        req.add_routes
            .push((dev::parse_route(&route, v6).map_err(bad)?, via));
    }
    for a in del_addrs {
        req.del_addrs.push(dev::parse_addr(a).map_err(bad)?);
    }
    for r in del_routes {
        req.del_routes
            .push(dev::parse_route(r, false).map_err(bad)?);
    }
    Ok(req)
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    dev::parse_mac(s).map_err(|m| anyhow::anyhow!("--mac {m}"))
}

fn random_mac() -> Result<[u8; 6]> {
    let mut bytes = [0u8; 6];
    tapir_sys::random::fill(&mut bytes).context("random bytes for a MAC address")?;
    Ok(tapir::echo::local_mac(bytes))
}

/// A flag set by SIGINT and SIGTERM, for loops that end cleanly.
fn shutdown_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&flag))
            .context("installing a signal handler")?;
    }
    Ok(flag)
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn run(cli: Cli, matches: &ArgMatches) -> Result<ExitCode> {
    match cli.command {
        Command::Doctor { json, tun } => {
            let report = doctor::run(&tun.tun_path);
            if json {
                print_json(&report)?;
            } else {
                print!("{}", doctor::format(&report));
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Echo {
            name,
            mode,
            addrs,
            only,
            pcap,
            mac,
            tun,
        } => {
            let bad = |e: String| anyhow::anyhow!("{e}; nothing was changed");
            let req = tapir::echo::EchoRequest {
                name: tapir_sys::IfName::new(&name)?,
                mode,
                addrs: addrs
                    .iter()
                    .map(|a| dev::parse_addr(a))
                    .collect::<Result<_, _>>()
                    .map_err(bad)?,
                only: only
                    .iter()
                    .map(|a| dev::parse_ip(a, "--only"))
                    .collect::<Result<_, _>>()
                    .map_err(bad)?,
                pcap,
                mac_given: mac.is_some(),
                mac: match mac {
                    Some(m) => parse_mac(&m)?,
                    None => random_mac()?,
                },
                tun_path: tun.tun_path,
            };
            let shutdown = shutdown_flag()?;
            let report = tapir::echo::run(&req, &shutdown)?;
            // On stderr: stdout may be the capture (--pcap -).
            eprint!("{}", tapir::echo::format_stats(&report));
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { file, dirs, tun } => {
            let file = tapir::config::resolve_path(&file);
            let configs = tapir::config::load_any(&file)?;
            for w in configs.iter().flat_map(|c| &c.warnings) {
                eprintln!("tapir: warning: {w}");
            }
            // Devices declared beside the tunnels are up's (and the devices
            // unit's) to make: said, where run went on without them (not
            // where up made them: it said so under up too).
            if file.extension().is_some_and(|e| e == "toml") {
                if let Ok((_, devices)) = tapir::config::load_file(&file) {
                    let mut nl = tapir_sys::Netlink::open().ok();
                    let names: Vec<&str> = devices
                        .iter()
                        .map(|d| d.name.as_str())
                        .filter(|n| {
                            !nl.as_mut()
                                .is_some_and(|nl| nl.link(n).is_ok_and(|l| l.is_some()))
                        })
                        .collect();
                    if !names.is_empty() {
                        eprintln!(
                            "tapir: warning: {} declares devices ({}) that run does not make: tapir up {} makes them with the tunnels (or tapir-devices.service, from /etc/tapir/devices.toml)",
                            file.display(),
                            names.join(", "),
                            file.display()
                        );
                    }
                }
            }
            let shutdown = shutdown_flag()?;
            // A PreUp or PostUp that hangs is ended by a stop (tapir down, or
            // Ctrl-C), and the start taken back: it held the process.
            tapir::tunnel::ops::stop_up_hooks_on(Arc::clone(&shutdown));
            let reload = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&reload))
                .context("installing a signal handler")?;
            let dirs = dirs.dirs();
            let names: Vec<&str> = configs.iter().map(|c| c.name.as_str()).collect();
            let pid_files = tapir::service::OwnPidFiles::of(&dirs, &names);
            let result =
                tapir::tunnel::run_all(&configs, &tun.tun_path, &dirs.run, &shutdown, &reload);
            // Stopped (by SIGTERM too, not only by tapir down): the pid
            // files up wrote for this process go with it.
            pid_files.forget();
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Up { file, dirs, tun } => {
            let file = tapir::config::resolve_path(&file);
            let me = std::env::current_exe().context("finding the tapir binary")?;
            // Ctrl-C, or a closed terminal, while it waits: the tunnel is
            // stopped and takes back what it did (it stayed, with no record).
            // A second one ends up at once (where it waits on something
            // that does not look at the flag: a name's look-up).
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [
                signal_hook::consts::SIGINT,
                signal_hook::consts::SIGTERM,
                signal_hook::consts::SIGHUP,
            ] {
                signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&stop))
                    .context("installing a signal handler")?;
                signal_hook::flag::register(sig, Arc::clone(&stop))
                    .context("installing a signal handler")?;
            }
            let up = tapir::service::up(&me, &file, &tun.tun_path, &dirs.dirs(), &stop)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            for d in &up.devices {
                println!("{d}");
            }
            for w in &up.warnings {
                eprintln!("{w}");
            }
            for n in up.names {
                println!("{n} is up");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Down { name, dirs } => {
            // A file (as up takes it: its extension may be left out); a
            // name with a slash is always a file, never an interface.
            let path = tapir::config::resolve_path(std::path::Path::new(&name));
            if path.is_file() || name.contains('/') {
                let mut failed = false;
                for line in tapir::service::down_file(&path, &dirs.dirs())
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                {
                    match line {
                        Ok(l) => println!("{l}"),
                        Err(e) => {
                            eprintln!("tapir: {e}");
                            failed = true;
                        }
                    }
                }
                return Ok(if failed {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                });
            }
            let also = |also: &[String]| {
                if also.is_empty() {
                    String::new()
                } else {
                    format!(", and {} with it (one process, one file)", also.join(", "))
                }
            };
            match tapir::service::down(&name, &dirs.dirs()).map_err(|e| anyhow::anyhow!("{e}"))? {
                tapir::service::Stopped::Stopped(_, others) => {
                    println!("{name} is down{}", also(&others))
                }
                tapir::service::Stopped::WasDead(pid, others) => println!(
                    "{name} is down{} (its process, pid {pid}, had already exited: cleared what it left)",
                    also(&others)
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload { name } => {
            let r = tapir::service::reload(&name).map_err(|e| anyhow::anyhow!("{e}"))?;
            for n in &r.notes {
                eprintln!("tapir: {name}: {n}");
            }
            for n in &r.failed {
                eprintln!("tapir: {name}: error: {n}");
            }
            println!(
                "{name} reloaded{}: {} peer(s) added, {} removed, {} changed; the others untouched",
                if r.failed.is_empty() { "" } else { " in part" },
                r.added,
                r.removed,
                r.changed
            );
            if let Some(p) = r.listen_port {
                println!("{name} now listens on port {p}");
            }
            if r.new_key {
                println!("{name} has the file's private key now: its sessions start again");
            }
            // As `wg syncconf` refused: a script sees that not all was made.
            Ok(if r.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Status { name, json, dirs } => {
            let st = tapir::service::status(name.as_deref(), &dirs.dirs())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if json {
                print_json(&st)?;
            } else {
                print!("{}", tapir::service::format(&st));
            }
            // As `systemctl status`: 3 when a tunnel asked about is not
            // running (one that runs but would not answer a user does).
            let dead: Vec<&str> = st
                .iter()
                .filter(|t| !t.running && t.unanswered.is_none())
                .map(|t| t.name.as_str())
                .collect();
            if dead.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!(
                    "tapir: not running: {} (tapir down NAME clears what it left)",
                    dead.join(", ")
                );
                Ok(ExitCode::from(3))
            }
        }
        Command::Demo { seconds, tcp, tap } => {
            // Which signal asked it to stop (0: none): a closed terminal's
            // SIGHUP too, which would otherwise leave the lab behind.
            let signal = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            for sig in [
                signal_hook::consts::SIGINT,
                signal_hook::consts::SIGTERM,
                signal_hook::consts::SIGHUP,
            ] {
                signal_hook::flag::register_usize(sig, Arc::clone(&signal), sig as usize)
                    .context("installing a signal handler")?;
            }
            let me = std::env::current_exe().context("finding the tapir binary")?;
            let kind = tapir::demo::Kind { tcp, tap };
            let result = tapir::demo::run(&me, seconds, kind, &signal);
            let sig = signal.load(std::sync::atomic::Ordering::Relaxed);
            if sig != 0 {
                let name = nix::sys::signal::Signal::try_from(sig as i32)
                    .map_or_else(|_| sig.to_string(), |s| s.as_str().to_owned());
                // (Not eprintln!: after SIGHUP the terminal answers EIO.)
                let _ = std::io::Write::write_fmt(
                    &mut std::io::stderr(),
                    format_args!(
                        "tapir: demo interrupted ({name}): everything it created is removed\n"
                    ),
                );
                return Ok(ExitCode::from(128 + sig as u8));
            }
            match result {
                Ok(()) => {
                    // (`tapir demo | head`: a closed pipe is no failure.)
                    let _ = std::io::Write::write_all(
                        &mut std::io::stdout(),
                        b"\ndemo done: the tunnel carried a ping and a bulk transfer; nothing is left behind\n",
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(anyhow::anyhow!(
                    "demo: {e}; everything it created is removed"
                )),
            }
        }
        Command::WireguardGo {
            foreground,
            name,
            tun,
            dirs,
        } => {
            let name = tapir_sys::IfName::new(&name)?;
            if foreground || tapir::tunnel::engine::foreground_from_env() {
                let shutdown = shutdown_flag()?;
                tapir::tunnel::engine::run(&name, &tun.tun_path, &shutdown)?;
            } else {
                let me = std::env::current_exe().context("finding the tapir binary")?;
                let scope = tapir::scope::Scope::current().map_err(|e| anyhow::anyhow!("{e}"))?;
                let log = scope.dir(&dirs.dirs().log).join(format!("{name}.log"));
                tapir::tunnel::engine::daemonize(&me, &name, &tun.tun_path, &log)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::QemuIfup {
            name,
            bridge,
            addr,
            dirs,
        } => {
            let tap = tapir_sys::IfName::new(&name)?;
            let bridge = bridge.as_deref().map(tapir_sys::IfName::new).transpose()?;
            let addr = addr
                .as_deref()
                .map(dev::parse_addr)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--addr: {e}"))?;
            for line in tapir::qemu::ifup(&tap, bridge.as_ref(), addr, &dirs.dirs().run)? {
                eprintln!("tapir: {line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::QemuIfdown { name, addr, dirs } => {
            let tap = tapir_sys::IfName::new(&name)?;
            let addr = addr
                .as_deref()
                .map(dev::parse_addr)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--addr: {e}"))?;
            for line in tapir::qemu::ifdown(&tap, addr, &dirs.dirs().run)? {
                eprintln!("tapir: {line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain { what, json } => {
            let e = tapir::explain::explain(&what)?;
            if json {
                print_json(&e)?;
            } else {
                print!("{}", tapir::explain::format(&e));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::GuestNet(cmd) => {
            let e = |e: String| anyhow::anyhow!("{e}");
            match cmd {
                GuestNetCommand::Up {
                    name,
                    subnet,
                    out,
                    dns,
                    dirs,
                } => {
                    let name = tapir_sys::IfName::new(&name)?;
                    let subnet = tapir::guestnet::parse_subnet(&subnet).map_err(e)?;
                    let me = std::env::current_exe().context("finding the tapir binary")?;
                    for line in
                        tapir::guestnet::up(&me, &name, subnet, out.as_deref(), &dns, &dirs.dirs())
                            .map_err(e)?
                    {
                        println!("{line}");
                    }
                }
                GuestNetCommand::Down { name, dirs } => {
                    let name = tapir_sys::IfName::new(&name)?;
                    for line in tapir::guestnet::down(&name, &dirs.dirs()).map_err(e)? {
                        println!("{line}");
                    }
                    println!("{name} is down");
                }
                GuestNetCommand::Status { name, json, dirs } => {
                    let name = tapir_sys::IfName::new(&name)?;
                    let st = tapir::guestnet::status(&name, &dirs.dirs()).map_err(e)?;
                    if json {
                        print_json(&st)?;
                    } else {
                        println!(
                            "guest network {}: {} on bridge {} ({}), DHCP {}, NAT {}",
                            st.name,
                            st.state.subnet,
                            st.name,
                            if st.bridge_present {
                                "present"
                            } else {
                                "MISSING"
                            },
                            if st.dhcp_running {
                                "running"
                            } else {
                                "NOT RUNNING"
                            },
                            st.state
                                .out
                                .as_deref()
                                .map_or("off".to_string(), |o| format!("out of {o}"))
                        );
                        if st.leases.is_empty() {
                            println!("  no leases yet");
                        }
                        for l in &st.leases {
                            println!(
                                "  {} {} {}{}",
                                l.ip,
                                l.mac,
                                if l.bound { "bound" } else { "offered" },
                                l.hostname
                                    .as_deref()
                                    .map(|h| format!(" ({h})"))
                                    .unwrap_or_default()
                            );
                        }
                    }
                }
                GuestNetCommand::Serve {
                    name,
                    subnet,
                    dns,
                    dirs,
                } => {
                    let name = tapir_sys::IfName::new(&name)?;
                    let subnet = tapir::guestnet::parse_subnet(&subnet).map_err(e)?;
                    let shutdown = shutdown_flag()?;
                    tapir::guestnet::serve(&name, subnet, dns, &dirs.dirs().run, &shutdown)?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Nat(cmd) => {
            let entry = |source: &str, out: String| -> Result<tapir::nat::Entry> {
                let source = dev::parse_addr(source)
                    .map_err(|e| anyhow::anyhow!("--source: {e}"))?
                    .trunc();
                Ok(tapir::nat::Entry { source, out })
            };
            match cmd {
                NatCommand::Enable { source, out, dirs } => {
                    let e = entry(&source, out)?;
                    if tapir::nat::enable(&e, &dirs.dirs().run)
                        .map_err(|e| anyhow::anyhow!("{e}"))?
                    {
                        println!("nat enabled: {} out of {} (forwarding on)", e.source, e.out);
                    } else {
                        println!(
                            "nat already enabled for {} out of {}: nothing changed",
                            e.source, e.out
                        );
                    }
                }
                NatCommand::Disable { source, out, dirs } => {
                    let which = match (source, out) {
                        (Some(s), Some(o)) => Some(entry(&s, o)?),
                        _ => None,
                    };
                    let gone = tapir::nat::disable(which.as_ref(), &dirs.dirs().run)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    if gone.is_empty() {
                        println!(
                            "nat was not enabled{}: nothing to do",
                            which
                                .map(|w| format!(" for {} out of {}", w.source, w.out))
                                .unwrap_or_default()
                        );
                    }
                    for g in gone {
                        println!("nat disabled: {} out of {}", g.source, g.out);
                    }
                }
                NatCommand::Status { json } => {
                    let st = tapir::nat::status().map_err(|e| anyhow::anyhow!("{e}"))?;
                    if json {
                        print_json(&st)?;
                    } else {
                        if st.entries.is_empty() {
                            println!(
                                "nat: nothing enabled (tapir nat enable --source CIDR --out IFACE)"
                            );
                        }
                        for e in &st.entries {
                            println!("nat: {} out of {} (masquerade, forwarded)", e.source, e.out);
                        }
                        println!(
                            "forwarding: IPv4 {}, IPv6 {}",
                            if st.ipv4_forwarding { "on" } else { "off" },
                            if st.ipv6_forwarding { "on" } else { "off" }
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "tapir", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::InstallUnits { dir } => {
            let me = std::env::current_exe()
                .and_then(std::fs::canonicalize)
                .context("finding the tapir binary")?;
            for path in
                tapir::service::install_units(&dir, &me).map_err(|e| anyhow::anyhow!("{e}"))?
            {
                println!("wrote {}", path.display());
            }
            // The unit hides these (PrivateTmp=, ProtectHome=): a binary
            // there would not start under it (203/EXEC).
            if ["/tmp", "/var/tmp", "/home", "/root", "/run/user"]
                .iter()
                .any(|d| me.starts_with(d))
            {
                eprintln!(
                    "tapir: warning: the units run {}, which the service does not see (PrivateTmp=, ProtectHome=): install it first (install -m 755 {} /usr/local/bin/tapir), then run /usr/local/bin/tapir install-units",
                    me.display(),
                    me.display()
                );
            }
            println!(
                "next: put a config in /etc/tapir/NAME.conf (or NAME.toml, mode 600), then: systemctl daemon-reload && systemctl enable --now tapir@NAME\ndevices at boot: declare them in /etc/tapir/devices.toml ([[device]] tables), then: systemctl enable --now tapir-devices"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir: None } => {
            clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .context("writing the manual page")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir: Some(dir) } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("writing the manual pages into {}", dir.display()))?;
            let pages = std::fs::read_dir(&dir)
                .map(|d| {
                    d.flatten()
                        .filter(|e| {
                            let n = e.file_name().to_string_lossy().into_owned();
                            n.starts_with("tapir") && n.ends_with(".1")
                        })
                        .count()
                })
                .unwrap_or(0);
            println!(
                "{pages} manual pages in {} (man tapir, man tapir-dev...)",
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Genkey => {
            warn_if_world_readable_stdout();
            let key = tapir_proto::wg::keys::PrivateKey::from_random(tapir::tunnel::random32()?);
            println!("{}", key.to_base64());
            Ok(ExitCode::SUCCESS)
        }
        Command::Genpsk => {
            warn_if_world_readable_stdout();
            let key = tapir_proto::wg::keys::PresharedKey::from_random(tapir::tunnel::random32()?);
            println!("{}", key.to_base64());
            Ok(ExitCode::SUCCESS)
        }
        Command::Pubkey => {
            use std::io::Read;
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading stdin")?;
            let key = tapir_proto::wg::keys::PrivateKey::from_base64(&text);
            zeroize::Zeroize::zeroize(&mut text);
            let key = key.map_err(|e| anyhow::anyhow!("stdin: {e}"))?;
            println!("{}", key.public_key().to_base64());
            Ok(ExitCode::SUCCESS)
        }
        Command::Dump {
            name,
            mode,
            count,
            write,
            snaplen,
            tun,
        } => {
            let req = tapir::dump::DumpRequest {
                name: tapir_sys::IfName::new(&name)?,
                mode,
                count,
                write,
                snaplen,
                tun_path: tun.tun_path,
            };
            let shutdown = shutdown_flag()?;
            let seen = tapir::dump::run(&req, &mut std::io::stdout().lock(), &shutdown)?;
            eprintln!("{seen} packet{} captured", if seen == 1 { "" } else { "s" });
            Ok(ExitCode::SUCCESS)
        }
        Command::Dev(DevCommand::Add {
            name,
            mode,
            user,
            group,
            multi_queue,
            vnet_hdr,
            pi,
            exist_ok,
            tun,
        }) => {
            let req = AddRequest::new(
                name.as_deref(),
                mode,
                user.as_deref(),
                group.as_deref(),
                (pi, vnet_hdr, multi_queue),
                exist_ok,
                tun.tun_path,
            )?;
            match dev::add(&req)? {
                Added::Created(name) => println!("{name}"),
                Added::Existed(name) => {
                    eprintln!("{name} already exists with these settings");
                    println!("{name}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dev(DevCommand::Del { name, force }) => {
            let gone = dev::del(&name, force)?;
            if gone.attached_queues > 0 {
                eprintln!(
                    "note: {} had {} queue(s) open; the programs holding them now get errors on read and write",
                    gone.name, gone.attached_queues
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dev(DevCommand::List { json }) => {
            let devs = dev::list()?;
            if json {
                print_json(&devs)?;
            } else {
                print!("{}", dev::format_list(&devs));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dev(DevCommand::Show { name, json }) => {
            let d = dev::show(&name)?;
            if json {
                print_json(&d)?;
            } else {
                print!("{}", dev::format_show(&d));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dev(DevCommand::Set {
            name,
            up,
            down,
            mtu,
            promisc,
            del_addrs,
            del_routes,
            ..
        }) => {
            let m = matches
                .subcommand_matches("dev")
                .and_then(|m| m.subcommand_matches("set"))
                .context("internal: no matches for dev set")?;
            let req = set_request(
                m,
                up,
                down,
                mtu,
                promisc.as_deref(),
                &del_addrs,
                &del_routes,
            )?;
            let (steps, gone) = dev::set(&name, &req)?;
            if steps.is_empty() {
                eprintln!("{name}: nothing to change");
            }
            for s in steps {
                eprintln!("{name}: {s}");
            }
            for a in gone {
                eprintln!(
                    "{name}: address {a} went with it ({})",
                    if a.addr().is_ipv4() {
                        "a secondary address goes with its primary; net.ipv4.conf.DEV.promote_secondaries=1 keeps it"
                    } else {
                        "the kernel drops IPv6 addresses of a link that goes down"
                    }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// As `wg genkey`: a key written into a file others can read is said so.
fn warn_if_world_readable_stdout() {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata("/proc/self/fd/1");
    if let Ok(m) = meta {
        if m.file_type().is_file() && m.mode() & 0o077 != 0 {
            eprintln!(
                "tapir: warning: writing a secret key to a file that group or others can read (mode {:o}): set umask 077 first, or chmod 600 the file",
                m.mode() & 0o777
            );
        }
    }
}

/// `tun` or `tap`, offered as such to shell completions.
fn mode_parser() -> impl clap::builder::TypedValueParser<Value = Mode> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["tun", "tap"])
        .map(|m| if m == "tap" { Mode::Tap } else { Mode::Tun })
}

fn main() -> ExitCode {
    // Run through a link named tapir-wireguard-go (or wireguard-go), as
    // wg-quick runs its userspace implementation: `NAME IFNAME`.
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let called = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned());
    match called.as_deref() {
        Some("tapir-wireguard-go" | "wireguard-go") => args.insert(1, "wireguard-go".into()),
        // QEMU's script= and downscript= (settings from TAPIR_QEMU_*).
        Some("tapir-qemu-ifup") => args.insert(1, "qemu-ifup".into()),
        Some("tapir-qemu-ifdown") => args.insert(1, "qemu-ifdown".into()),
        _ => {}
    }
    let matches = Cli::command().get_matches_from(args);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // Commands that print and end: quiet at a closed pipe (`| head`).
    if matches!(
        cli.command,
        Command::Doctor { .. }
            | Command::Dev(_)
            | Command::Status { .. }
            | Command::Explain { .. }
            | Command::Completions { .. }
            | Command::Man { .. }
            | Command::Genkey
            | Command::Pubkey
            | Command::Genpsk
            | Command::Dump { .. }
    ) {
        tapir_sys::process::default_sigpipe();
    }
    match run(cli, &matches) {
        Ok(code) => code,
        Err(e) => {
            // Our errors carry their causes in their own text; add only the
            // causes (from .context()) that the text does not already hold.
            let mut text = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !text.contains(&c) {
                    text = format!("{text}: {c}");
                }
            }
            eprintln!("tapir: {text}");
            ExitCode::FAILURE
        }
    }
}
