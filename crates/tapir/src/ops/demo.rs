//! `tapir demo`: the lab in one command. Two network namespaces joined by a
//! veth, a tapir tunnel between them, a ping and a short throughput figure
//! through it; each step printed with the commands a user would type, and
//! everything removed at the end, on failure, and on Ctrl-C.
//!
//! ```text
//!   ns A: veth-a 10.200.0.1 ──veth── veth-b 10.200.0.2 :ns B
//!         tp-a   10.99.0.1  ═tapir═  tp-b   10.99.0.2
//! ```
//! It needs `ip` (iproute2); `ping` and `iperf3` are used when installed, and
//! replaced by built-in equivalents (a UDP echo, a TCP bulk transfer) when not.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tapir_proto::wg::keys::PrivateKey;

/// `println!` that goes on where the terminal is gone: a hung-up terminal
/// answers writes with EIO, and `println!` would panic in the middle of
/// the clean-up that SIGHUP asked for.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// [`say!`] for standard error.
macro_rules! say_err {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// Everything the demo created, removed on drop (also on error or Ctrl-C).
struct Lab {
    namespaces: Vec<String>,
    children: Vec<Child>,
    dir: PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        end(&mut self.children);
        let mut left = Vec::new();
        for ns in &self.namespaces {
            let deleted = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !deleted && Path::new("/run/netns").join(ns).exists() {
                left.push(ns.as_str());
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if !left.is_empty() {
            say_err!(
                "tapir: demo: could not remove namespace {}: ip netns del {}",
                left.join(" and "),
                left.join("; ip netns del ")
            );
        } else if !self.namespaces.is_empty() {
            say!(
                "\n==> cleaned up: namespaces {} removed",
                self.namespaces.join(" and ")
            );
        }
    }
}

/// A program the demo starts: in a process group of its own, so that a
/// Ctrl-C at the terminal reaches the demo alone (which ends it in its
/// turn, by its pid), and ended with the demo if the demo is killed.
fn started(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    tapir_sys::process::dies_with_parent(cmd);
    cmd.process_group(0).stdin(Stdio::null())
}

fn show(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Runs `cmd` to its end and returns what it printed; a signal to the demo
/// ends it at once (by its pid) and the step with "interrupted".
fn step(cmd: &mut Command, signal: &AtomicUsize) -> Result<String, String> {
    say!("$ {}", show(cmd));
    let mut child = started(cmd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", show(cmd)))?;
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    std::thread::scope(|s| {
        let out = s.spawn(move || read_all(stdout));
        let err = s.spawn(move || read_all(stderr));
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                break status;
            }
            if check(signal).is_err() {
                end(std::slice::from_mut(&mut child));
                return Err("interrupted".to_string());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = out.join().unwrap_or_default();
        let stderr = err.join().unwrap_or_default();
        if !status.success() {
            return Err(format!("{} failed: {stderr}{stdout}", show(cmd)));
        }
        Ok(stdout)
    })
}

/// What a program wrote to `pipe`, to its end.
fn read_all(pipe: Option<impl Read>) -> String {
    let mut text = Vec::new();
    if let Some(mut p) = pipe {
        let _ = p.read_to_end(&mut text);
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// Ends programs the demo started, by pid: SIGTERM first (so that tapir
/// takes its tunnel down cleanly), then SIGKILL for any still running 3 s
/// later.
fn end(children: &mut [Child]) {
    for c in children.iter() {
        if let Ok(pid) = i32::try_from(c.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    for c in children.iter_mut() {
        while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn has(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join(program).is_file()))
}

/// Waits (5 s at most) until a TCP server listens on `port` in namespace
/// `ns` (`ss`, of iproute2): a fixed 300 ms was not always enough on a busy
/// machine, and the client, refused, ended the demo.
fn listening(ns: &str, port: u16, signal: &AtomicUsize) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let filter = format!("sport = :{port}");
    while Instant::now() < deadline {
        check(signal)?;
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "ss", "-Hltn", &filter])
            .stderr(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() && !o.stdout.is_empty() => return Ok(()),
            Ok(o) if o.status.success() => std::thread::sleep(Duration::from_millis(50)),
            // (No ss: as before, a moment's grace.)
            _ => {
                std::thread::sleep(Duration::from_millis(300));
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Whether a signal (its number in `signal`, 0 for none) asked the demo to stop.
fn check(signal: &AtomicUsize) -> Result<(), String> {
    if signal.load(Ordering::Relaxed) != 0 {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

/// What the demo's tunnel is made of.
#[derive(Debug, Clone, Copy, Default)]
pub struct Kind {
    /// Over TCP (udp2tcp's framing): A connects to B's port 51820.
    pub tcp: bool,
    /// In tap mode: Ethernet frames, so ARP crosses the tunnel too.
    pub tap: bool,
}

/// Runs the demo. `tapir` is the path of this binary (for the tunnel
/// processes); `signal` is set to the number of a signal that asks it to
/// stop (SIGINT, SIGTERM, SIGHUP), which it then does within a moment,
/// taking down what it made.
pub fn run(tapir: &Path, seconds: u64, kind: Kind, signal: &AtomicUsize) -> Result<(), String> {
    if !crate::caps::has_net_admin() {
        return Err(crate::caps::net_admin_missing(
            "the demo (it creates network namespaces)",
        ));
    }
    if !has("ip") {
        return Err("the demo needs ip from iproute2: apt-get install iproute2".into());
    }
    let id = std::process::id();
    let (a, b) = (format!("tapir-demo-{id}-a"), format!("tapir-demo-{id}-b"));
    // A new directory of our own (created, never reused, mode 0700): files
    // written as root must not follow links someone planted in /tmp.
    let suffix: String = random32_hex()?;
    let dir = std::env::temp_dir().join(format!("tapir-demo-{id}-{suffix}"));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut lab = Lab {
        namespaces: Vec::new(),
        children: Vec::new(),
        dir: dir.clone(),
    };

    say!("==> 1. two network namespaces, joined by a veth pair");
    for ns in [&a, &b] {
        // Not one of another demo's (a pid used again, its lab left by a kill).
        if Path::new("/run/netns").join(ns).exists() {
            return Err(format!(
                "a namespace {ns} exists already (left by an earlier demo that was killed?): ip netns del {ns}"
            ));
        }
        // Recorded first: a signal may end the step after the kernel made it.
        lab.namespaces.push(ns.clone());
        step(Command::new("ip").args(["netns", "add", ns]), signal)?;
        step(
            Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]),
            signal,
        )?;
    }
    step(
        Command::new("ip").args([
            "link", "add", "veth-a", "netns", &a, "type", "veth", "peer", "name", "veth-b",
            "netns", &b,
        ]),
        signal,
    )?;
    step(
        Command::new("ip").args(["-n", &a, "addr", "add", "10.200.0.1/24", "dev", "veth-a"]),
        signal,
    )?;
    step(
        Command::new("ip").args(["-n", &b, "addr", "add", "10.200.0.2/24", "dev", "veth-b"]),
        signal,
    )?;
    step(
        Command::new("ip").args(["-n", &a, "link", "set", "veth-a", "up"]),
        signal,
    )?;
    step(
        Command::new("ip").args(["-n", &b, "link", "set", "veth-b", "up"]),
        signal,
    )?;
    check(signal)?;

    say!("\n==> 2. a key pair for each end (tapir genkey | tee a.key | tapir pubkey)");
    let random =
        || crate::tunnel::random32().map_err(|e| format!("randomness from the kernel: {e}"));
    let ka = PrivateKey::from_random(random()?);
    let kb = PrivateKey::from_random(random()?);
    say!(
        "   A's public key {}\n   B's public key {}",
        ka.public_key(),
        kb.public_key()
    );
    say!("   by hand: wg genkey | tee a.key | wg pubkey");

    say!(
        "\n==> 3. a tapir tunnel between them (tapir run NAME.conf, a wg-quick file){}{}",
        if kind.tap {
            ", in tap mode (Ethernet frames)"
        } else {
            ""
        },
        if kind.tcp {
            ", over TCP (A connects to B)"
        } else {
            ""
        }
    );
    let conf = |me: &PrivateKey, peer: &PrivateKey, addr: &str, peer_addr: &str, endpoint: &str| {
        let mut extra = String::new();
        if kind.tap {
            extra += "Mode = tap\n";
        }
        if kind.tcp {
            extra += "Transport = tcp\n";
        }
        // Over TCP one end connects and the other listens.
        let endpoint = if kind.tcp && addr == "10.99.0.2" {
            String::new()
        } else {
            format!("Endpoint = {endpoint}:51820\n")
        };
        format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\nAddress = {addr}/24\n{extra}\n[Peer]\nPublicKey = {}\n{endpoint}AllowedIPs = {peer_addr}/32\n",
            me.to_base64(),
            peer.public_key()
        )
    };
    for (ns, file, text) in [
        (
            &a,
            "tp-a.conf",
            conf(&ka, &kb, "10.99.0.1", "10.99.0.2", "10.200.0.2"),
        ),
        (
            &b,
            "tp-b.conf",
            conf(&kb, &ka, "10.99.0.2", "10.99.0.1", "10.200.0.1"),
        ),
    ] {
        let path = dir.join(file);
        write_private(&path, &text)?;
        say!("   {} (PrivateKey shown as ...):", path.display());
        for line in text.lines() {
            let shown = if line.starts_with("PrivateKey") {
                "PrivateKey = ...".to_string()
            } else {
                line.to_string()
            };
            say!("     {shown}");
        }
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(tapir)
            .arg("run")
            .arg(&path);
        let log_path = path.with_extension("log");
        say!("$ {} 2> {} &", show(&cmd), log_path.display());
        let log =
            std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let child = started(&mut cmd)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{}: {e}", show(&cmd)))?;
        lab.children.push(child);
    }
    say!(
        "   by hand, each tapir run does what these do: ip tuntap add dev tp-a mode {}; ip addr add 10.99.0.1/24 dev tp-a;\n   ip link set tp-a up; then a WireGuard{} daemon on the device (wireguard-go tp-a; wg setconf tp-a FILE)",
        if kind.tap { "tap" } else { "tun" },
        if kind.tcp { " (over udp2tcp)" } else { "" }
    );
    for (i, (ns, dev)) in [(&a, "tp-a"), (&b, "tp-b")].into_iter().enumerate() {
        wait_link(ns, dev, &mut lab.children[i], signal).map_err(|e| {
            let log = std::fs::read_to_string(dir.join(format!("{dev}.log"))).unwrap_or_default();
            format!("{e}; its log: {}", log.trim())
        })?;
    }

    say!("\n==> 4. ping through the tunnel");
    if has("ping") {
        let out = step(
            Command::new("ip").args([
                "netns",
                "exec",
                &a,
                "ping",
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "3",
                "10.99.0.2",
            ]),
            signal,
        )?;
        for line in out
            .lines()
            .filter(|l| l.contains("packet loss") || l.starts_with("rtt"))
        {
            say!("   {line}");
        }
    } else {
        say!("   (ping is not installed: a built-in UDP echo through the tunnel instead)");
        let rtts = udp_echo(&a, &b, signal)?;
        say!("   3 echoes, round trips {rtts:?}");
    }
    check(signal)?;

    say!("\n==> 5. throughput through the tunnel, {seconds} s");
    if has("iperf3") {
        let mut server = Command::new("ip");
        server.args(["netns", "exec", &b, "iperf3", "-s", "-1", "-B", "10.99.0.2"]);
        say!("$ {} &", show(&server));
        lab.children.push(
            started(&mut server)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| e.to_string())?,
        );
        listening(&b, 5201, signal)?;
        let out = step(
            Command::new("ip").args([
                "netns",
                "exec",
                &a,
                "iperf3",
                "-c",
                "10.99.0.2",
                "-t",
                &seconds.to_string(),
            ]),
            signal,
        )?;
        // iperf3's summary: its column header, then the sender's and the
        // receiver's lines.
        let summary: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("receiver") || l.contains("sender"))
            .collect();
        if let Some(header) = out.lines().rfind(|l| l.contains("[ ID]")) {
            if !summary.is_empty() {
                say!("   {}", header.trim());
            }
        }
        for line in summary {
            say!("   {}", line.trim());
        }
    } else {
        say!("   (iperf3 is not installed: a built-in TCP bulk transfer instead)");
        let gbps = bulk(&a, &b, Duration::from_secs(seconds), signal)?;
        say!("   {gbps:.2} Gbit/s from A to B through the tunnel");
    }
    check(signal)?;
    drop(lab);
    Ok(())
}

fn random32_hex() -> Result<String, String> {
    let bytes =
        crate::tunnel::random32().map_err(|e| format!("randomness from the kernel: {e}"))?;
    Ok(bytes[..8].iter().map(|b| format!("{b:02x}")).collect())
}

fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Waits for `dev` to appear in `ns`, made by `tunnel` (which must not end first).
fn wait_link(ns: &str, dev: &str, tunnel: &mut Child, signal: &AtomicUsize) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        check(signal)?;
        if let Ok(Some(status)) = tunnel.try_wait() {
            return Err(format!("the tunnel {dev} did not start ({status})"));
        }
        let ok = Command::new("ip")
            .args(["-n", ns, "link", "show", "dev", dev])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the tunnel {dev} did not come up in {ns} within 10 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> Result<T, String> + Send) -> Result<T, String> {
    let path = Path::new("/run/netns").join(ns);
    std::thread::scope(|s| {
        s.spawn(move || {
            tapir_sys::netns::enter(&path).map_err(|e| e.to_string())?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err("a demo thread panicked".into()))
    })
}

/// How often a blocking step of the built-in tools looks for a signal.
const GLANCE: Duration = Duration::from_millis(100);

/// Whether an I/O error is a timeout of a socket's own (`GLANCE`).
fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// A datagram on `sock` within `limit`, or an error (a signal: "interrupted").
fn recv_within(
    sock: &UdpSocket,
    buf: &mut [u8],
    limit: Duration,
    signal: &AtomicUsize,
) -> Result<(usize, std::net::SocketAddr), String> {
    sock.set_read_timeout(Some(GLANCE))
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + limit;
    loop {
        check(signal)?;
        match sock.recv_from(buf) {
            Err(e) if timed_out(&e) && Instant::now() < deadline => {}
            r => return r.map_err(|e| e.to_string()),
        }
    }
}

fn udp_echo(a: &str, b: &str, signal: &AtomicUsize) -> Result<Vec<Duration>, String> {
    std::thread::scope(|s| {
        let server = s.spawn(|| {
            in_ns(b, || {
                let sock = UdpSocket::bind("10.99.0.2:7").map_err(|e| e.to_string())?;
                let mut buf = [0u8; 64];
                for _ in 0..3 {
                    let (n, from) = recv_within(&sock, &mut buf, Duration::from_secs(10), signal)?;
                    sock.send_to(&buf[..n], from).map_err(|e| e.to_string())?;
                }
                Ok(())
            })
        });
        std::thread::sleep(Duration::from_millis(200));
        let rtts = in_ns(a, || {
            let sock = UdpSocket::bind("10.99.0.1:0").map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            for i in 0..3u8 {
                let t = Instant::now();
                sock.send_to(&[i; 32], "10.99.0.2:7")
                    .map_err(|e| e.to_string())?;
                let mut buf = [0u8; 64];
                recv_within(&sock, &mut buf, Duration::from_secs(5), signal).map_err(|e| {
                    if check(signal).is_err() {
                        e
                    } else {
                        format!("no echo through the tunnel: {e}")
                    }
                })?;
                out.push(t.elapsed());
            }
            Ok(out)
        })?;
        server.join().unwrap_or_else(|_| Err("panicked".into()))?;
        Ok(rtts)
    })
}

fn bulk(a: &str, b: &str, duration: Duration, signal: &AtomicUsize) -> Result<f64, String> {
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let server = s.spawn(move || {
            in_ns(b, || {
                let l = TcpListener::bind("10.99.0.2:5201").map_err(|e| e.to_string())?;
                let _ = tx.send(());
                // Bounded: a broken tunnel ends the demo with an error, not a hang.
                l.set_nonblocking(true).map_err(|e| e.to_string())?;
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut c = loop {
                    check(signal)?;
                    match l.accept() {
                        Ok((c, _)) => break c,
                        Err(e)
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                && Instant::now() < deadline =>
                        {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => return Err(format!("no connection through the tunnel: {e}")),
                    }
                };
                c.set_nonblocking(false).map_err(|e| e.to_string())?;
                c.set_read_timeout(Some(GLANCE))
                    .map_err(|e| e.to_string())?;
                let mut buf = vec![0u8; 1 << 16];
                let mut total = 0u64;
                // Ten seconds without a byte is a broken tunnel.
                let mut last = Instant::now();
                loop {
                    check(signal)?;
                    match c.read(&mut buf) {
                        Ok(0) => return Ok(total),
                        Ok(n) => {
                            total += n as u64;
                            last = Instant::now();
                        }
                        Err(e) if timed_out(&e) && last.elapsed() < Duration::from_secs(10) => {}
                        Err(e) => return Err(e.to_string()),
                    }
                }
            })
        });
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| "the receiver did not start".to_string())?;
        let started = Instant::now();
        in_ns(a, || {
            let mut c = TcpStream::connect_timeout(
                &"10.99.0.2:5201".parse().expect("constant"),
                Duration::from_secs(5),
            )
            .map_err(|e| e.to_string())?;
            c.set_write_timeout(Some(Duration::from_secs(10)))
                .map_err(|e| e.to_string())?;
            let chunk = vec![0x5au8; 1 << 16];
            while started.elapsed() < duration {
                check(signal)?;
                c.write_all(&chunk).map_err(|e| e.to_string())?;
            }
            Ok(())
        })?;
        let total = server.join().unwrap_or_else(|_| Err("panicked".into()))?;
        Ok(total as f64 * 8.0 / started.elapsed().as_secs_f64() / 1e9)
    })
}
