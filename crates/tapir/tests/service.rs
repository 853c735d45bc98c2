//! `tapir up`, `status`, `down`: background tunnels that leave nothing behind.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use netlab::{Lab, Netns, require_root};
use serde_json::Value;

const TAPIR: &str = env!("CARGO_BIN_EXE_tapir");

struct Env {
    _lab: Lab,
    ns: Netns,
    dir: PathBuf,
}

fn env(tag: &str) -> Env {
    let lab = Lab::new();
    let ns = lab.netns("svc");
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("svc-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Env { _lab: lab, ns, dir }
}

impl Env {
    fn tapir(&self, args: &[&str]) -> Output {
        self.ns
            .cmd(TAPIR)
            .args(args)
            .env("TAPIR_RUN_DIR", self.dir.join("run"))
            .env("TAPIR_LOG_DIR", self.dir.join("log"))
            .output()
            .unwrap()
    }

    fn file(&self, name: &str, text: &str, mode: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, text).unwrap();
        Command::new("chmod")
            .args([mode, p.to_str().unwrap()])
            .status()
            .unwrap();
        p
    }

    /// Nothing of tunnel `name` is left: device, pid file, control socket, process.
    fn assert_clean(&self, name: &str) {
        assert!(!self.ns.has_link(name), "device {name} left behind");
        assert!(
            !self.dir.join("run").join(format!("{name}.pid")).exists(),
            "pid file left behind"
        );
        assert!(
            !Path::new(&format!("/var/run/wireguard/{name}.sock")).exists(),
            "control socket left behind"
        );
        let out = Command::new("ip")
            .args(["netns", "pids", self.ns.name()])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).trim().is_empty(),
            "a process is left in the namespace"
        );
    }
}

fn key() -> String {
    let out = Command::new(TAPIR).arg("genkey").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

const PEER: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

fn name(tag: &str) -> String {
    format!("{tag}{}", std::process::id() % 100_000)
}

#[test]
fn up_status_down_leaves_nothing() {
    require_root!();
    let e = env("cycle");
    let n = name("tsu");
    let conf = e.file(
        &format!("{n}.conf"),
        &format!("[Interface]\nPrivateKey = {}\nListenPort = 51830\nAddress = 10.88.0.1/24\n[Peer]\nPublicKey = {PEER}\nAllowedIPs = 10.88.0.2/32\n", key()),
        "600",
    );
    let out = e.tapir(&["up", conf.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(e.ns.has_link(&n), "up returns once the device exists");
    let out = e.tapir(&["status", "--json"]);
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st[0]["name"], n.as_str());
    assert_eq!(st[0]["running"], true);
    assert_eq!(st[0]["listen_port"], 51830);
    assert_eq!(st[0]["peers"][0]["public_key"], PEER);
    assert_eq!(st[0]["peers"][0]["allowed_ips"][0], "10.88.0.2/32");
    let pid = st[0]["pid"].as_i64().unwrap();
    let text = String::from_utf8_lossy(&e.tapir(&["status", &n]).stdout).into_owned();
    assert!(
        text.contains("latest handshake: never") && text.contains("datapath:"),
        "{text}"
    );
    // A second up of the same tunnel is refused.
    let again = e.tapir(&["up", conf.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already up"));
    let out = e.tapir(&["down", &n]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z")
    );
    e.assert_clean(&n);
    let out = e.tapir(&["down", &n]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not up"));
}

#[test]
fn a_broken_config_fails_with_the_reason_and_leaves_nothing() {
    require_root!();
    let e = env("broken");
    let n = name("tsb");
    let good_key = key();
    // Something else holds the port.
    let _holder = e.ns.run(|| UdpSocket::bind("0.0.0.0:51831").unwrap());
    let keyfile = e.file("loose.key", &format!("{good_key}\n"), "644");
    let cases = [
        (
            "[Interface]\nPrivateKey = notakey\nListenPort = 51832\n".to_string(),
            "PrivateKey: not a WireGuard key",
        ),
        (
            format!("[Interface]\nPrivateKey = {good_key}\nListenPort = 51831\n"),
            "cannot listen on UDP port 51831",
        ),
        (
            format!(
                "[Interface]\nPrivateKeyFile = {}\nListenPort = 51832\n",
                keyfile.display()
            ),
            "readable by group or others",
        ),
        (
            format!(
                "[Interface]\nPrivateKeyFile = {}/missing.key\n",
                e.dir.display()
            ),
            "cannot read",
        ),
        (
            format!("[Interface]\nPrivateKey = {good_key}\n[Peer]\nPublicKey = short\n"),
            "PublicKey: not a WireGuard key",
        ),
        (
            format!(
                "[Interface]\nPrivateKey = {good_key}\nAddress = 10.88.0.1/24\n[Peer]\nPublicKey = {PEER}\nEndpoint = no-such-host.invalid:51820\nAllowedIPs = 10.88.0.2/32\n"
            ),
            "does not resolve",
        ),
    ];
    for (text, want) in cases {
        let conf = e.file(&format!("{n}.conf"), &text, "600");
        let out = e.tapir(&["up", conf.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}");
        assert!(err.contains(want), "{text:?}: {err}");
        e.assert_clean(&n);
    }
}

#[test]
fn up_refuses_a_control_socket_that_someone_else_answers() {
    require_root!();
    let e = env("plant");
    let n = name("tpl");
    // Someone listens on the tunnel's socket path first.
    let path = format!("/var/run/wireguard/{n}.sock");
    let _ = std::fs::create_dir_all("/var/run/wireguard");
    let _ = std::fs::remove_file(&path);
    let planted = std::os::unix::net::UnixListener::bind(&path).unwrap();
    planted.set_nonblocking(true).unwrap();
    let conf = e.file(
        &format!("{n}.conf"),
        &format!("[Interface]\nPrivateKey = {}\nListenPort = 51831\nAddress = 10.88.1.1/24\n[Peer]\nPublicKey = {PEER}\nAllowedIPs = 10.88.1.2/32\n", key()),
        "600",
    );
    let out = e.tapir(&["up", conf.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "up trusted a planted socket");
    assert!(
        err.contains("another process holds that name")
            && err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    drop(planted);
    let _ = std::fs::remove_file(&path);
    assert!(!e.ns.has_link(&n), "nothing left behind");
    assert!(
        !e.dir.join("run").join(format!("{n}.pid")).exists(),
        "no pid file for a tunnel that is not up"
    );
}

#[test]
fn up_refuses_a_log_directory_others_can_write_to() {
    require_root!();
    let e = env("logdir");
    let n = name("tlg");
    let log = e.dir.join("log");
    std::fs::create_dir_all(&log).unwrap();
    Command::new("chmod")
        .args(["1777", log.to_str().unwrap()])
        .status()
        .unwrap();
    let conf = e.file(
        &format!("{n}.conf"),
        &format!("[Interface]\nPrivateKey = {}\nListenPort = 51832\nAddress = 10.88.2.1/24\n[Peer]\nPublicKey = {PEER}\nAllowedIPs = 10.88.2.2/32\n", key()),
        "600",
    );
    let out = e.tapir(&["up", conf.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        err.contains("writable by group or others") && err.contains("chmod 755"),
        "{err}"
    );
    e.assert_clean(&n);
}
