//! Helpers shared by the integration tests: processes we started (ended by
//! pid), keys from the tapir binary, waits, ping and checked bulk transfers
//! between network namespaces.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::path::PathBuf;

use netlab::{Lab, Netns};
use sha2::{Digest, Sha256};

pub const TAPIR: &str = env!("CARGO_BIN_EXE_tapir");

pub fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A key pair from the tapir binary (genkey, then pubkey).
pub fn genkey() -> (String, String) {
    let private = sh(Command::new(TAPIR).arg("genkey"));
    let public = pipe(Command::new(TAPIR).arg("pubkey"), &private);
    (private, public)
}

/// Runs `cmd` with `input` on its stdin; its stdout, trimmed (it must succeed).
pub fn pipe(cmd: &mut Command, input: &str) -> String {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A process we started, ended by its pid on drop.
pub struct Proc(pub Option<Child>);

impl Proc {
    pub fn stop(&mut self) -> String {
        let mut c = self.0.take().unwrap();
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut err = String::new();
        if let Some(mut e) = c.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        err
    }

    /// SIGKILL, as a crash: nothing taken back.
    #[allow(dead_code)] // not every test file uses every helper
    pub fn kill(&mut self) {
        let mut c = self.0.take().unwrap();
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Proc {
    /// SIGTERM first, so that tapir removes its control socket and device;
    /// SIGKILL after 3 s.
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(3);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn wait_for(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub fn ping(ns: &Netns, to: &str) {
    let out = ns
        .cmd("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "3", to])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(" 0% packet loss"),
        "ping {to}: {text}"
    );
}

/// A name no other test's wireguard-go uses (its socket path is global).
pub fn ifname(tag: &str) -> String {
    format!("{tag}{}", std::process::id() % 100_000)
}

/// Sends `len` pseudo-random bytes over TCP from `from` to a listener in `to`
/// at `addr`; both ends hash what they saw and must agree.
pub fn transfer(from: &Netns, to: &Netns, addr: &str, len: usize) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let to_path = to.path();
        let server = s.spawn(move || {
            tapir_sys::netns::enter(&to_path).unwrap();
            let listener = TcpListener::bind(addr).unwrap();
            tx.send(()).unwrap();
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            let mut hash = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0;
            loop {
                let n = conn.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                hash.update(&buf[..n]);
                total += n;
            }
            (total, hash.finalize())
        });
        rx.recv().unwrap();
        let from_path = from.path();
        let client = s.spawn(move || {
            tapir_sys::netns::enter(&from_path).unwrap();
            let mut conn =
                TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(10))
                    .unwrap();
            conn.set_write_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            let mut hash = Sha256::new();
            let mut x: u64 = 0x2545f4914f6cdd1d;
            let mut chunk = vec![0u8; 1 << 16];
            let mut sent = 0;
            while sent < len {
                for w in chunk.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
                }
                let n = chunk.len().min(len - sent);
                conn.write_all(&chunk[..n]).unwrap();
                hash.update(&chunk[..n]);
                sent += n;
            }
            hash.finalize()
        });
        let sent_hash = client.join().unwrap();
        let (got, got_hash) = server.join().unwrap();
        assert_eq!(got, len);
        assert_eq!(got_hash, sent_hash, "sha256 of what arrived");
    });
}

/// Writes `text` to `dir/name` with mode 600 (configs hold private keys).
pub fn write_private(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// `tapir run FILE` in `ns`, once device `ifname` exists.
pub fn run_tapir(ns: &Netns, file: &std::path::Path, ifname: &str) -> Proc {
    let child = ns
        .cmd(TAPIR)
        .args(["run", file.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut p = Proc(Some(child));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ns.has_link(ifname) {
        if let Some(c) = p.0.as_mut() {
            if c.try_wait().unwrap().is_some() {
                let mut err = String::new();
                let _ = c.stderr.take().unwrap().read_to_string(&mut err);
                panic!("tapir run {} exited: {err}", file.display());
            }
        }
        assert!(Instant::now() < deadline, "timed out waiting for {ifname}");
        std::thread::sleep(Duration::from_millis(25));
    }
    p
}

/// `tapir status NAME --json` for a tunnel run by `proc` (a pid file is
/// written for it in `dir`), parsed.
pub fn status_json(
    ns: &Netns,
    dir: &std::path::Path,
    name: &str,
    proc: &Proc,
) -> serde_json::Value {
    // `tapir status` finds a tunnel run by hand through its control socket.
    let run = dir.join("run");
    let pid = proc.0.as_ref().unwrap().id();
    let out = ns
        .cmd(TAPIR)
        .args(["status", name, "--json"])
        .env("TAPIR_RUN_DIR", &run)
        .env("TAPIR_LOG_DIR", dir.join("log"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let v = v.as_array().and_then(|a| a.first()).cloned().unwrap_or(v);
    assert_eq!(v["pid"], pid, "status names the process that runs {name}");
    v
}

/// `tapir status NAME` as text (see [`status_json`]).
pub fn status_text(ns: &Netns, dir: &std::path::Path, name: &str, proc: &Proc) -> String {
    status_json(ns, dir, name, proc);
    let out = ns
        .cmd(TAPIR)
        .args(["status", name])
        .env("TAPIR_RUN_DIR", dir.join("run"))
        .env("TAPIR_LOG_DIR", dir.join("log"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A ping that must get every reply, with its options.
pub fn ping_args(ns: &Netns, args: &[&str], to: &str) {
    let out = ns
        .cmd("ping")
        .args(args)
        .args(["-W", "3", to])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(" 0% packet loss"),
        "ping {args:?} {to}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A counter of interface `dev` in `ns` (`rx_packets`, `tx_bytes`...).
pub fn counter(ns: &Netns, dev: &str, which: &str) -> u64 {
    let out = ns
        .cmd("cat")
        .arg(format!("/sys/class/net/{dev}/statistics/{which}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Resident memory of process `pid`, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

pub struct Bed {
    pub lab: Lab,
    pub a: Netns,
    pub b: Netns,
    pub dir: PathBuf,
}

pub fn bed(tag: &str) -> Bed {
    let lab = Lab::new();
    let a = lab.netns("a");
    let b = lab.netns("b");
    lab.veth(&a, "va", &b, "vb");
    a.ip(&["addr", "add", "10.200.0.1/24", "dev", "va"]);
    b.ip(&["addr", "add", "10.200.0.2/24", "dev", "vb"]);
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("wg-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    Bed { lab, a, b, dir }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct Side<'a> {
    pub ns: &'a Netns,
    pub name: String,
    pub port: u16,
    pub addr: &'a str,
}

/// tapir on `side`, with `peer` reachable at `endpoint` (None: wait to be contacted).
pub fn tapir(
    bed: &Bed,
    side: &Side,
    private: &str,
    peer: &str,
    endpoint: Option<&str>,
    allowed: &str,
) -> Proc {
    tapir_psk(bed, side, private, peer, endpoint, allowed, None)
}

pub fn tapir_psk(
    bed: &Bed,
    side: &Side,
    private: &str,
    peer: &str,
    endpoint: Option<&str>,
    allowed: &str,
    psk: Option<&str>,
) -> Proc {
    let conf = bed.dir.join(format!("{}.conf", side.name));
    let mut text = format!(
        "[Interface]\nPrivateKey = {private}\nListenPort = {}\nAddress = {}/24\n\n[Peer]\nPublicKey = {peer}\nAllowedIPs = {allowed}\n",
        side.port, side.addr
    );
    if let Some(e) = endpoint {
        text += &format!("Endpoint = {e}\n");
    }
    if let Some(k) = psk {
        text += &format!("PresharedKey = {k}\n");
    }
    std::fs::write(&conf, text).unwrap();
    std::process::Command::new("chmod")
        .args(["600", conf.to_str().unwrap()])
        .status()
        .unwrap();
    let child = side
        .ns
        .cmd(TAPIR)
        .arg("run")
        .arg(&conf)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(|| side.ns.has_link(&side.name), "the tapir interface");
    Proc(Some(child))
}

/// wireguard-go on `side`, configured with `wg set`.
pub fn wireguard_go(
    bed: &Bed,
    side: &Side,
    private: &str,
    peer: &str,
    endpoint: Option<&str>,
    allowed: &str,
) -> Proc {
    wireguard_go_psk(bed, side, private, peer, endpoint, allowed, None)
}

pub fn wireguard_go_psk(
    bed: &Bed,
    side: &Side,
    private: &str,
    peer: &str,
    endpoint: Option<&str>,
    allowed: &str,
    psk: Option<&str>,
) -> Proc {
    let child = side
        .ns
        .cmd("env")
        .args(["WG_PROCESS_FOREGROUND=1", "wireguard-go", "-f", &side.name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("wireguard-go (Debian package wireguard-go) must be installed");
    let sock = PathBuf::from(format!("/var/run/wireguard/{}.sock", side.name));
    wait_for(|| sock.exists(), "the wireguard-go control socket");
    let key = bed.dir.join(format!("{}.key", side.name));
    std::fs::write(&key, private).unwrap();
    let mut args = vec![
        "set".to_string(),
        side.name.clone(),
        "private-key".into(),
        key.to_str().unwrap().into(),
        "listen-port".into(),
        side.port.to_string(),
        "peer".into(),
        peer.into(),
        "allowed-ips".into(),
        allowed.into(),
    ];
    if let Some(e) = endpoint {
        args.extend(["endpoint".into(), e.into()]);
    }
    if let Some(k) = psk {
        let f = bed.dir.join(format!("{}.psk", side.name));
        std::fs::write(&f, k).unwrap();
        args.extend(["preshared-key".into(), f.to_str().unwrap().into()]);
    }
    sh(side.ns.cmd("wg").args(&args));
    side.ns.ip(&[
        "addr",
        "add",
        &format!("{}/24", side.addr),
        "dev",
        &side.name,
    ]);
    side.ns.ip(&["link", "set", &side.name, "up"]);
    Proc(Some(child))
}

pub fn nft(ns: &Netns, script: &str) {
    let mut child = ns
        .cmd("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft (Debian package nftables)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "nft: {script}");
}

/// Time until a ping from `ns` to `to` is answered (one try every 200 ms, at most `limit`).
pub fn first_reply(ns: &Netns, to: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    while start.elapsed() < limit {
        let t = Instant::now();
        if ns
            .cmd("ping")
            .args(["-c", "1", "-W", "1", to])
            .output()
            .unwrap()
            .status
            .success()
        {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(200).saturating_sub(t.elapsed()));
    }
    panic!("no reply from {to} within {limit:?}");
}

/// `tapir ARGS` in `ns`, with run and log directories under `dir`.
#[allow(dead_code)] // not every test file uses every helper
pub fn tapir_in(ns: &Netns, dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    ns.cmd(TAPIR)
        .args(args)
        .env("TAPIR_RUN_DIR", dir.join("run"))
        .env("TAPIR_LOG_DIR", dir.join("log"))
        .output()
        .unwrap()
}

/// A command's stdout, after checking it succeeded (its output otherwise).
#[allow(dead_code)]
pub fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A namespace's identity, as tapir names its directories.
/// The name of `ns`'s own directories under tapir's (`netns-INODE-COOKIE`).
pub fn netns_dir(ns: &Netns) -> String {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(ns.path()).unwrap().ino();
    let path = ns.path();
    let cookie = std::thread::spawn(move || {
        tapir_sys::netns::enter(&path).unwrap();
        tapir_sys::netns::cookie().unwrap()
    })
    .join()
    .unwrap();
    format!("netns-{ino}-{cookie}")
}
