//! `tapir up`, `status`, `down`: background tunnels that leave nothing behind.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use netlab::{Lab, Netns, require_root};
use serde_json::Value;

const TAPIR: &str = env!("CARGO_BIN_EXE_tapir");

mod support;
use support::netns_dir;

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

    /// `tapir ARGS` that must succeed (its stderr shown if not).
    fn ok(&self, args: &[&str]) -> Output {
        let out = self.tapir(args);
        assert!(
            out.status.success(),
            "tapir {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn file(&self, name: &str, text: &str, mode: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
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
        let pid_files = Command::new("find")
            .args([self.dir.join("run").to_str().unwrap(), "-name", "*.pid"])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&pid_files.stdout).trim().is_empty(),
            "pid file left behind"
        );
        let sockets = Command::new("find")
            .args(["/var/run/wireguard", "-name", &format!("{name}.sock")])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&sockets.stdout).trim().is_empty(),
            "control socket left behind: {}",
            String::from_utf8_lossy(&sockets.stdout)
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

/// A one-peer tunnel's file: port `port`, addresses in 10.88.`net`.0/24,
/// `extra` lines in its [Interface].
fn tunnel_text(port: u16, net: u8, extra: &str) -> String {
    format!(
        "[Interface]\nPrivateKey = {}\nListenPort = {port}\nAddress = 10.88.{net}.1/24\n{extra}[Peer]\nPublicKey = {PEER}\nAllowedIPs = 10.88.{net}.2/32\n",
        key()
    )
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
    let conf = e.file(&format!("{n}.conf"), &tunnel_text(51830, 0, ""), "600");
    e.ok(&["up", conf.to_str().unwrap()]);
    assert!(e.ns.has_link(&n), "up returns once the device exists");
    let log = e
        .dir
        .join("log")
        .join(netns_dir(&e.ns))
        .join(format!("{n}.log"));
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(&log).unwrap().mode() & 0o777,
            0o600,
            "hooks' output is in the log"
        );
    }
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
    e.ok(&["down", &n]);
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
            ".conf): cannot listen on UDP port 51831",
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
            // (Line 6, the Endpoint's, not the [Peer] header's.)
            ".conf:6: Endpoint no-such-host.invalid:51820 does not resolve",
        ),
        (
            format!("[Interface]\nPrivateKey = {good_key}\nAddress = fd05::1/64\nPostUp = false\n"),
            "PostUp = false: exit status: 1",
        ),
    ];
    for (text, want) in cases {
        let conf = e.file(&format!("{n}.conf"), &text, "600");
        let out = e.tapir(&["up", conf.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}");
        assert!(err.contains(want), "{text:?}: {err}");
        // Not quoted from the log: that it was up a moment, before the
        // PostUp (it said "did not come up" and "up (tun mode)" at once).
        assert!(!err.contains(": up ("), "{err}");
        e.assert_clean(&n);
    }
    // IPv6 off: the address named, and what to do.
    let sysctl = |v: &str| {
        e.ns.cmd("sysctl")
            .args(["-qw", &format!("net.ipv6.conf.default.disable_ipv6={v}")])
            .status()
            .unwrap()
    };
    assert!(sysctl("1").success());
    let conf = e.file(
        &format!("{n}.conf"),
        &format!("[Interface]\nPrivateKey = {good_key}\nAddress = fd05::1/64\n"),
        "600",
    );
    let out = e.tapir(&["up", conf.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("address fd05::1/64: ")
            && err.contains("disable_ipv6=0"),
        "{err}"
    );
    e.assert_clean(&n);
    assert!(sysctl("0").success());
    // A run directory that cannot be: the setting named.
    let out =
        e.ns.cmd(TAPIR)
            .args(["up", conf.to_str().unwrap()])
            .env("TAPIR_RUN_DIR", "/proc/nope")
            .env("TAPIR_LOG_DIR", e.dir.join("log"))
            .output()
            .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("the run directory (--run-dir, TAPIR_RUN_DIR): /proc/nope"),
        "{err}"
    );
}

#[test]
fn up_refuses_a_control_socket_that_someone_else_answers() {
    require_root!();
    let e = env("plant");
    let n = name("tpl");
    // Someone listens on the tunnel's socket path first (in a network
    // namespace other than the host's, it is that namespace's own).
    let dir = format!("/var/run/wireguard/{}", netns_dir(&e.ns));
    let path = format!("{dir}/{n}.sock");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::remove_file(&path);
    let planted = std::os::unix::net::UnixListener::bind(&path).unwrap();
    planted.set_nonblocking(true).unwrap();
    let conf = e.file(&format!("{n}.conf"), &tunnel_text(51831, 1, ""), "600");
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
    let _ = std::fs::remove_dir(&dir);
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
    let conf = e.file(&format!("{n}.conf"), &tunnel_text(51832, 2, ""), "600");
    let out = e.tapir(&["up", conf.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        err.contains("writable by group or others") && err.contains("chmod 755"),
        "{err}"
    );
    e.assert_clean(&n);
}

#[test]
fn the_same_name_in_two_namespaces_never_mixes() {
    require_root!();
    // One run directory for both, as on a real host: the namespace keeps them apart.
    let e = env("twons");
    let other = e._lab.netns("svc2");
    let n = name("tsn");
    let (ka, kb) = (key(), key());
    let conf = |k: &str, port: u16| {
        e.file(
            &format!("{n}-{port}/{n}.conf"),
            &format!("[Interface]\nPrivateKey = {k}\nListenPort = {port}\nAddress = 10.88.3.1/24\n[Peer]\nPublicKey = {PEER}\nAllowedIPs = 10.88.3.2/32\n"),
            "600",
        )
    };
    let (ca, cb) = (conf(&ka, 51841), conf(&kb, 51842));
    let tapir_in = |ns: &Netns, args: &[&str]| {
        ns.cmd(TAPIR)
            .args(args)
            .env("TAPIR_RUN_DIR", e.dir.join("run"))
            .env("TAPIR_LOG_DIR", e.dir.join("log"))
            .output()
            .unwrap()
    };
    for (ns, c) in [(&e.ns, &ca), (&other, &cb)] {
        let out = tapir_in(ns, &["up", c.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "the same name in another namespace is its own tunnel: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let public = |k: &str| {
        let out = support_pipe(TAPIR, &["pubkey"], k);
        out.trim().to_owned()
    };
    let (pa, pb) = (public(&ka), public(&kb));
    let status = |ns: &Netns| -> Value {
        let out = tapir_in(ns, &["status", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (sa, sb) = (status(&e.ns), status(&other));
    assert_eq!(sa.as_array().unwrap().len(), 1, "{sa}");
    assert_eq!(sb.as_array().unwrap().len(), 1, "{sb}");
    assert_eq!(sa[0]["public_key"], pa.as_str());
    assert_eq!(sa[0]["listen_port"], 51841);
    assert_eq!(sb[0]["public_key"], pb.as_str());
    assert_eq!(sb[0]["listen_port"], 51842);
    assert_ne!(sa[0]["pid"], sb[0]["pid"]);
    // Stock wg: in the first namespace it sees the first tunnel; in the
    // second it may not see its own (the usual path is the first's), but
    // it never sees the first's.
    let wg = |ns: &Netns| {
        let out = ns.cmd("wg").args(["show", &n]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let seen_a = wg(&e.ns);
    assert!(seen_a.contains(&pa) && seen_a.contains("51841"), "{seen_a}");
    let seen_b = wg(&other);
    assert!(
        !seen_b.contains(&pa),
        "wg in the second namespace saw the first's tunnel: {seen_b}"
    );
    // Down in one leaves the other running.
    let out = tapir_in(&e.ns, &["down", &n]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!e.ns.has_link(&n));
    assert!(
        other.has_link(&n),
        "down in the first namespace took the second's tunnel"
    );
    let sb = status(&other);
    assert_eq!(sb[0]["running"], true);
    assert_eq!(sb[0]["public_key"], pb.as_str());
    let out = tapir_in(&other, &["down", &n]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    e.assert_clean(&n);
    assert!(!other.has_link(&n));
}

/// Kills the running tunnel of `up` named `n` with SIGKILL (no clean-up at
/// all) and waits for its device to go; returns its pid.
fn kill_outright(e: &Env, n: &str) -> i32 {
    let st: Value = serde_json::from_slice(&e.tapir(&["status", "--json"]).stdout).unwrap();
    let pid = st[0]["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while e.ns.has_link(n) {
        assert!(
            std::time::Instant::now() < deadline,
            "the device outlived its process"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    pid
}

#[test]
fn status_sees_tunnels_run_by_hand_and_says_what_to_do_about_a_dead_one() {
    require_root!();
    let e = env("dead");
    let n = name("tsd");
    let conf = e.file(&format!("{n}.conf"), &tunnel_text(51843, 4, ""), "600");
    // `tapir run` in the foreground, as systemd runs it: no pid file.
    let mut child =
        e.ns.cmd(TAPIR)
            .args(["run", conf.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = e.tapir(&["status", "--json"]);
        let st: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if st[0]["running"] == true {
            assert_eq!(st[0]["name"], n.as_str());
            assert_eq!(st[0]["pid"], child.id());
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "status never listed {n}: {st}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // down stops it too.
    e.ok(&["down", &n]);
    assert!(child.wait().unwrap().success(), "SIGTERM ends it cleanly");
    e.assert_clean(&n);
    // Started with up, then killed outright.
    e.ok(&["up", conf.to_str().unwrap()]);
    let pid = kill_outright(&e, &n);
    let out = e.tapir(&["status", &n]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "a dead tunnel is not a success: {text}"
    );
    assert!(
        text.contains("NOT RUNNING")
            && text.contains(&format!("pid {pid}"))
            && text.contains(&format!("see its log, {}", e.dir.join("log").display()))
            && text.contains(&format!("{n}.log"))
            && text.contains(&format!("tapir down {n}")),
        "{text}"
    );
    let out = e.ok(&["down", &n]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("had already exited"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    e.assert_clean(&n);
    // Killed outright again, and up at once, without a down: the stale pid
    // file and control socket do not block it.
    let up = e.tapir(&["up", conf.to_str().unwrap()]);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let pid = kill_outright(&e, &n);
    let up = e.tapir(&["up", conf.to_str().unwrap()]);
    assert!(
        up.status.success(),
        "up right after SIGKILL: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let st: Value = serde_json::from_slice(&e.tapir(&["status", "--json"]).stdout).unwrap();
    assert_eq!(st[0]["running"], true, "{st}");
    assert_ne!(st[0]["pid"].as_i64().unwrap() as i32, pid, "{st}");
    e.ok(&["down", &n]);
    e.assert_clean(&n);
}

/// Links planted where `up` writes its pid file and log: the pid file
/// replaces its link (the target is untouched), a linked log is refused
/// before anything starts.
#[test]
fn up_never_writes_through_a_planted_link() {
    require_root!();
    let e = env("links");
    let n = name("tln");
    let conf = e.file(&format!("{n}.conf"), &tunnel_text(51834, 4, ""), "600");
    let victim = e.file("victim", "precious\n", "644");
    // The namespace's own directories, as up makes them (root's, 0755).
    let own = netns_dir(&e.ns);
    let (run, log) = (e.dir.join("run").join(&own), e.dir.join("log").join(&own));
    for d in [&run, &log] {
        std::fs::create_dir_all(d).unwrap();
        Command::new("chmod")
            .args([
                "755",
                d.to_str().unwrap(),
                d.parent().unwrap().to_str().unwrap(),
            ])
            .status()
            .unwrap();
    }
    std::os::unix::fs::symlink(&victim, log.join(format!("{n}.log"))).unwrap();
    let out = e.tapir(&["up", conf.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && err.contains(&format!("{n}.log")),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    e.assert_clean(&n);
    std::fs::remove_file(log.join(format!("{n}.log"))).unwrap();
    let pid_path = run.join(format!("{n}.pid"));
    std::os::unix::fs::symlink(&victim, &pid_path).unwrap();
    e.ok(&["up", conf.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "precious\n",
        "written through the link"
    );
    let meta = std::fs::symlink_metadata(&pid_path).unwrap();
    assert!(
        meta.file_type().is_file(),
        "the link was replaced by the pid file"
    );
    e.ok(&["down", &n]);
    e.assert_clean(&n);
}

/// `program args` with `input` on its stdin; its stdout.
fn support_pipe(program: &str, args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout).into_owned()
}

#[test]
fn up_tells_its_warnings_and_the_daemon_keeps_nothing_of_the_caller() {
    require_root!();
    let e = env("hand");
    let n = name("tsh");
    let conf = e.file(&format!("{n}.conf"), &tunnel_text(51844, 5, ""), "600");
    // A tunnel of the name in another namespace holds wg's path for it:
    // the warning that `wg show NAME` here reaches that one.
    let other = e._lab.netns("oth");
    let up_other = other
        .cmd(TAPIR)
        .args(["up", conf.to_str().unwrap()])
        .env("TAPIR_RUN_DIR", e.dir.join("run"))
        .env("TAPIR_LOG_DIR", e.dir.join("log"))
        .output()
        .unwrap();
    assert!(
        up_other.status.success(),
        "{}",
        String::from_utf8_lossy(&up_other.stderr)
    );
    // A relative file name, from the caller's directory, with a descriptor
    // the caller left open (7).
    let out =
        e.ns.cmd("sh")
            .args([
                "-c",
                &format!("exec 7</etc/hostname; exec {TAPIR} up {n}.conf"),
            ])
            .current_dir(&e.dir)
            .env("TAPIR_RUN_DIR", e.dir.join("run"))
            .env("TAPIR_LOG_DIR", e.dir.join("log"))
            .env("PATH", "/usr/bin:/bin")
            .output()
            .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning") && err.contains("reach the tunnel of that name in another"),
        "the warning reaches the terminal: {err}"
    );
    let st: Value = serde_json::from_slice(&e.tapir(&["status", "--json"]).stdout).unwrap();
    let pid = st[0]["pid"].as_i64().unwrap();
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        Path::new("/"),
        "the daemon holds the caller's directory"
    );
    let leaked = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|f| std::fs::read_link(f.path()).ok())
        .any(|t| t == Path::new("/etc/hostname"));
    assert!(!leaked, "the daemon inherited the caller's descriptor 7");
    e.ok(&["down", &n]);
    let down_other = other
        .cmd(TAPIR)
        .args(["down", &n])
        .env("TAPIR_RUN_DIR", e.dir.join("run"))
        .env("TAPIR_LOG_DIR", e.dir.join("log"))
        .output()
        .unwrap();
    assert!(down_other.status.success());
    e.assert_clean(&n);
}

/// A file of two tunnels and a device: `down FILE` (its extension left
/// out, as up takes it) says each tunnel is down (one process ran both)
/// and keeps a device a process holds; `down NAME` names the tunnels that
/// go with it; an up that fails takes back the devices it created.
#[test]
fn down_of_a_file_names_each_tunnel_and_keeps_held_devices_and_a_failed_up_takes_its_devices() {
    require_root!();
    let e = env("dfile");
    let (t1, t2, dv) = (name("tf1x"), name("tf2x"), name("tfd"));
    let text = |port: u16| {
        format!(
            "[[device]]\nname = \"{dv}\"\nmode = \"tap\"\n\n\
             [[tunnel]]\nname = \"{t1}\"\nprivate_key = \"{}\"\nlisten_port = {port}\n\n\
             [[tunnel]]\nname = \"{t2}\"\nprivate_key = \"{}\"\nlisten_port = {}\n",
            key(),
            key(),
            port + 1
        )
    };
    let file = e.file("two.toml", &text(51841), "600");
    let stem = file.with_extension("");
    let ok = |args: &[&str]| {
        let out = e.tapir(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = e.tapir(&["up", file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    // (The tunnels' process warned that run does not make the devices,
    // which up had just made.)
    assert!(out.status.success() && !err.contains("warning"), "{err}");
    let out = ok(&["down", &t1]);
    assert!(
        out.contains(&format!("{t1} is down, and {t2} with it")),
        "{out}"
    );
    ok(&["up", file.to_str().unwrap()]);
    // A process holds the device (as a VM holds its tap).
    let holder =
        e.ns.cmd(TAPIR)
            .args(["dump", &dv])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
    let mut holder = Guard(holder);
    // Held once its carrier is up (a tun/tap has carrier while a process has it).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while e.ns.ip(&["link", "show", &dv]).contains("NO-CARRIER") {
        assert!(std::time::Instant::now() < deadline, "dump never held {dv}");
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let out = ok(&["down", stem.to_str().unwrap()]);
    assert!(
        out.contains(&format!("{t1} is down"))
            && out.contains(&format!("{t2} is down"))
            && !out.contains("was not up")
            && out.contains(&format!("{dv}: kept: tapir")),
        "{out}"
    );
    assert!(e.ns.has_link(&dv), "the held device stays");
    let _ = holder.0.kill();
    let _ = holder.0.wait();
    ok(&["dev", "del", &dv]);
    // An up whose tunnel cannot start: the device it made goes too.
    let _port = e.ns.run(|| UdpSocket::bind("0.0.0.0:51851").unwrap());
    let file = e.file("two.toml", &text(51851), "600");
    let out = e.tapir(&["up", file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        !e.ns.has_link(&dv),
        "a failed up leaves no device it created"
    );
    e.assert_clean(&t1);
}

/// Kills the child when dropped (a failed assertion leaves no process).
struct Guard(std::process::Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What tapir acts on as root (a pid to signal, rules to take back, hooks
/// to run) comes only from its own records: not from one a gone namespace
/// left under an inode the kernel gave again (planted here where the inode
/// alone would have led), not from one another user owns or could have
/// put there.
#[test]
fn records_of_a_gone_namespace_or_of_another_user_are_not_acted_on() {
    require_root!();
    let e = env("trust");
    let n = name("ttr");
    let marker = e.dir.join("hook-ran");
    let run = e.dir.join("run");
    let record = format!("hook PostDown touch {}\n", marker.display());
    let plant = |dir: &Path, owner: &str| {
        std::fs::create_dir_all(dir).unwrap();
        for (f, text) in [
            (format!("{n}.pid"), "999999\n"),
            (format!("{n}.rules"), &record),
        ] {
            let p = dir.join(f);
            std::fs::write(&p, text).unwrap();
            Command::new("chown")
                .args([owner, p.to_str().unwrap()])
                .status()
                .unwrap();
        }
    };
    // Where a namespace of this inode kept its records before.
    let ino = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(e.ns.path()).unwrap().ino()
    };
    plant(&run.join(format!("netns-{ino}")), "root");
    let out = e.tapir(&["status", &n]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("NOT RUNNING"), "{text}");
    let out = e.tapir(&["down", &n]);
    assert!(!out.status.success());
    assert!(!marker.exists(), "a gone namespace's hook ran");
    // In this namespace's own directory, but another user's record.
    let own = run.join(netns_dir(&e.ns));
    plant(&own, "65534");
    let out = e.tapir(&["down", &n]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!marker.exists(), "another user's hook ran as root: {err}");
    assert!(err.contains("not a file tapir wrote"), "{err}");
    // Root's record, but in a directory another user may write to.
    plant(&own, "root");
    Command::new("chmod")
        .args(["777", own.to_str().unwrap()])
        .status()
        .unwrap();
    let out = e.tapir(&["down", &n]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("only we may write"),
        "{err}"
    );
    assert!(!marker.exists());
    // Sound: acted on (the hook of a process that died runs at down).
    Command::new("chmod")
        .args(["755", own.to_str().unwrap()])
        .status()
        .unwrap();
    let out = e.tapir(&["down", &n]);
    assert!(marker.exists(), "{}", String::from_utf8_lossy(&out.stderr));
    // A directory above tapir's that another user owns (who could move
    // tapir's aside and put one of theirs in its place): refused.
    Command::new("chown")
        .args(["65534", e.dir.to_str().unwrap()])
        .status()
        .unwrap();
    let out = e.tapir(&["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("belongs to uid 65534"),
        "{err}"
    );
    std::fs::remove_dir_all(&e.dir).unwrap();
}

/// Hooks run as root: from a file another user owns or may write to, or
/// in a directory of theirs, the tunnel does not start (that user would
/// have root at its next start), and nothing of it is left.
#[test]
fn hooks_run_only_from_a_file_nobody_else_could_write() {
    require_root!();
    let e = env("hooks");
    let n = name("thk");
    let marker = e.dir.join("hook-ran");
    // (The key in a file of its own: this one's mode changes below.)
    let keyfile = e.file("hooks.key", &key(), "600");
    let text = format!(
        "[Interface]\nPrivateKeyFile = {}\nListenPort = 51836\nAddress = 10.88.6.1/24\nPostUp = touch {}\n[Peer]\nPublicKey = {PEER}\nAllowedIPs = 10.88.6.2/32\n",
        keyfile.display(),
        marker.display()
    );
    let conf = e.file(&format!("{n}.conf"), &text, "600");
    let path = conf.to_str().unwrap();
    let chown = |who: &str, p: &Path| {
        Command::new("chown")
            .args([who, p.to_str().unwrap()])
            .status()
            .unwrap();
    };
    chown("65534", &conf);
    let out = e.tapir(&["up", path]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("belongs to uid 65534"),
        "{err}"
    );
    chown("root", &conf);
    Command::new("chmod").args(["620", path]).status().unwrap();
    let out = e.tapir(&["up", path]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("writable by group or others"),
        "{err}"
    );
    Command::new("chmod").args(["600", path]).status().unwrap();
    chown("65534", &e.dir);
    let out = e.tapir(&["up", path]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("belongs to uid 65534"),
        "{err}"
    );
    assert!(!marker.exists(), "a hook ran");
    e.assert_clean(&n);
    // Root's file in root's directory: it starts, and its hook runs.
    chown("root", &e.dir);
    e.ok(&["up", path]);
    assert!(marker.exists());
    e.ok(&["down", &n]);
    e.assert_clean(&n);
    // Through a link another user owns (who could point it at a file of
    // theirs between the reading and the check): refused.
    let links = e.dir.join("links");
    std::fs::create_dir_all(&links).unwrap();
    let link = links.join(format!("{n}.conf"));
    std::os::unix::fs::symlink(&conf, &link).unwrap();
    Command::new("chown")
        .args(["-h", "65534", link.to_str().unwrap()])
        .status()
        .unwrap();
    let out = e.tapir(&["up", link.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("the link"), "{err}");
    e.assert_clean(&n);
}

/// A config reached through a symbolic link is named after the link, as
/// wg-quick names it (up waited for the link's name while the daemon made
/// the target's, and failed after 15 s).
#[test]
fn a_linked_config_is_named_after_the_link() {
    require_root!();
    let e = env("link");
    let n = name("tlk");
    let real = e.file("real/site-a.conf", &tunnel_text(51837, 7, ""), "600");
    let link = e.dir.join(format!("{n}.conf"));
    std::os::unix::fs::symlink(&real, &link).unwrap();
    e.ok(&["up", link.to_str().unwrap()]);
    assert!(e.ns.has_link(&n) && !e.ns.has_link("site-a"));
    e.ok(&["down", &n]);
    e.assert_clean(&n);
    // Stopped by SIGTERM, not by down: it leaves nothing either (its pid
    // file stayed, and status said NOT RUNNING).
    e.ok(&["up", link.to_str().unwrap()]);
    let st: Value = serde_json::from_slice(&e.tapir(&["status", "--json"]).stdout).unwrap();
    let pid = st[0]["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(std::time::Instant::now() < deadline, "still running");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    e.assert_clean(&n);
}

/// A user who is not root, in the tunnel's namespace: status finds the
/// tunnel where root's up put it (it said "not up in the host's network
/// namespace", then "NOT RUNNING"), and says it runs but answers root only.
#[test]
fn a_user_sees_that_a_tunnel_runs() {
    require_root!();
    let e = env("user");
    let n = name("tus");
    let conf = e.file(&format!("{n}.conf"), &tunnel_text(51838, 8, ""), "600");
    e.ok(&["up", conf.to_str().unwrap()]);
    let out =
        e.ns.cmd("setpriv")
            .args([
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                TAPIR,
                "status",
                &n,
            ])
            .env("TAPIR_RUN_DIR", e.dir.join("run"))
            .env("TAPIR_LOG_DIR", e.dir.join("log"))
            .output()
            .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("state: running (pid") && text.contains("as root"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    e.ok(&["down", &n]);
    e.assert_clean(&n);
}

/// Ups of one tunnel at once: one starts it, the others wait for it and
/// say it is up (they raced, and the loser's error held the winner's log
/// lines); down leaves no lock behind.
#[test]
fn ups_at_once_start_one_tunnel_and_the_others_say_so() {
    require_root!();
    let e = env("race");
    let n = name("trc");
    let conf = e.file(&format!("{n}.conf"), &tunnel_text(51839, 9, ""), "600");
    let path = conf.to_str().unwrap();
    let outs: Vec<Output> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3).map(|_| s.spawn(|| e.tapir(&["up", path]))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(ok, 1, "{outs:#?}");
    for o in outs.iter().filter(|o| !o.status.success()) {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("is already up") && !err.contains("up (tun mode)"),
            "{err}"
        );
    }
    e.ok(&["down", &n]);
    e.assert_clean(&n);
    let locks = Command::new("find")
        .args([e.dir.join("run").to_str().unwrap(), "-name", "*.lock"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&locks.stdout).trim().is_empty(),
        "a lock left behind"
    );
}

/// Ten thousand routed allowed IPs: `up` makes a route for each (it read
/// every table again for each route, and gave up after 15 s), a reload
/// gives a prefix inside another peer's wider one a route of its own (it
/// was skipped as covered, and left routeless when the wider one went),
/// and `down` takes them all back.
#[test]
fn ten_thousand_routes_come_and_go_and_a_covered_prefix_keeps_its_own() {
    require_root!();
    let e = env("routes");
    let n = name("trt");
    let pubkey = || support_pipe(TAPIR, &["pubkey"], &key()).trim().to_owned();
    let (p2, p3) = (pubkey(), pubkey());
    let many: Vec<String> = (0..10_000)
        .map(|i| format!("10.90.{}.{}/32", i / 250, 1 + i % 250))
        .collect();
    let text = |wide: bool, narrow: bool| {
        format!(
            "{}[Peer]\nPublicKey = {p2}\nAllowedIPs = 10.89.0.2/32{}\n[Peer]\nPublicKey = {p3}\nAllowedIPs = 10.89.0.3/32{}\n",
            tunnel_text(51840, 5, "").replace(
                "AllowedIPs = 10.88.5.2/32",
                &format!("AllowedIPs = {}", many.join(", "))
            ),
            if wide { ", 10.251.0.0/16" } else { "" },
            if narrow { ", 10.251.0.2/32" } else { "" },
        )
    };
    let conf = e.file(&format!("{n}.conf"), &text(false, false), "600");
    e.ok(&["up", conf.to_str().unwrap()]);
    let routes = |what: &[&str]| {
        let mut args = vec!["route", "show"];
        args.extend_from_slice(what);
        args.extend_from_slice(&["dev", &n]);
        e.ns.cmd("ip").args(&args).output().unwrap().stdout
    };
    let count = String::from_utf8_lossy(&routes(&[])).lines().count();
    assert!(count >= 10_002, "{count} routes");
    // The wider prefix (one peer's) listed before the narrower (another's).
    e.file(&format!("{n}.conf"), &text(true, true), "600");
    e.ok(&["reload", &n]);
    e.file(&format!("{n}.conf"), &text(false, true), "600");
    e.ok(&["reload", &n]);
    assert!(
        !routes(&["10.251.0.2/32"]).is_empty(),
        "10.251.0.2/32 has no route once 10.251.0.0/16 went"
    );
    e.ok(&["down", &n]);
    e.assert_clean(&n);
}

/// Whether a process whose command line is `cmd` runs in `ns`.
fn runs_in(ns: &Netns, cmd: &str) -> bool {
    let out = Command::new("ip")
        .args(["netns", "pids", ns.name()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .any(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(cmd))
                .unwrap_or(false)
        })
}

/// A PostUp that outlasts up's limit is waited for, as wg-quick waits for
/// it (up failed at 15 s, then hung until the hook ended); one that hangs
/// is ended, its processes with it, by Ctrl-C at up or by `tapir down`,
/// and the tunnel taken back (the hook's processes were left running, and
/// the daemon with no pid file after a Ctrl-C).
#[test]
fn a_slow_post_up_is_waited_for_and_a_hanging_one_ended_by_a_stop() {
    require_root!();
    let e = env("slowhook");
    let n = name("tsw");
    let up = |conf: &Path| {
        let mut c = e.ns.cmd(TAPIR);
        c.args(["up", conf.to_str().unwrap()])
            .env("TAPIR_RUN_DIR", e.dir.join("run"))
            .env("TAPIR_LOG_DIR", e.dir.join("log"))
            .env("TAPIR_UP_LIMIT", "4")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    let conf = e.file(
        &format!("{n}.conf"),
        &tunnel_text(51837, 7, "PostUp = sleep 5.5\n"),
        "600",
    );
    let out = up(&conf).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("waiting for `") && err.contains("sleep 5.5"),
        "{err}"
    );
    e.ok(&["down", &n]);
    e.assert_clean(&n);
    // A hanging PostUp of two processes (the shell stays: its whole group
    // must go), and a hanging PreUp, before the tunnel has a socket.
    for (how, hook, sleep) in [
        ("ctrl-c", "PostUp = sleep 3171; true", "sleep 3171"),
        ("down", "PostUp = sleep 3172; true", "sleep 3172"),
        ("down", "PreUp = sleep 3173; true", "sleep 3173"),
    ] {
        let conf = e.file(
            &format!("{n}.conf"),
            &tunnel_text(51837, 7, &format!("{hook}\n")),
            "600",
        );
        let child = up(&conf).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !runs_in(&e.ns, sleep) {
            assert!(Instant::now() < deadline, "{hook}: the hook never ran");
            std::thread::sleep(Duration::from_millis(50));
        }
        let started = Instant::now();
        if how == "ctrl-c" {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            )
            .unwrap();
        } else {
            e.ok(&["down", &n]);
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{hook}: {err}");
        if how == "ctrl-c" {
            assert!(err.contains("interrupted"), "{err}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{hook}: up returned {:?} after",
            started.elapsed()
        );
        e.assert_clean(&n);
    }
}
