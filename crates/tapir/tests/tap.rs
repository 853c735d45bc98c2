//! Tap-mode tunnels in network namespaces: a hub and two spokes that know
//! only the hub, all tapir, sharing one Ethernet segment.
//!
//! ```text
//!   s1: u1 10.201.1.2 ── veth ── h1 10.201.1.1 :hub: h2 10.201.2.1 ── veth ── u2 10.201.2.2 :s2
//!   tap 10.88.0.2 ═══════════ tap 10.88.0.1 (switch) ═══════════ tap 10.88.0.3 (or br0 with a "vm")
//! ```

use std::net::UdpSocket;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use netlab::{Lab, Netns, require_root};

mod support;
use support::*;

struct Star {
    lab: Lab,
    hub: Netns,
    s1: Netns,
    s2: Netns,
    dir: PathBuf,
    keys: [(String, String); 3],
    names: [String; 3],
}

impl Drop for Star {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn star(tag: &str) -> Star {
    let lab = Lab::new();
    let hub = lab.netns("hub");
    let s1 = lab.netns("s1");
    let s2 = lab.netns("s2");
    lab.veth(&hub, "h1", &s1, "u1");
    lab.veth(&hub, "h2", &s2, "u2");
    hub.ip(&["addr", "add", "10.201.1.1/24", "dev", "h1"]);
    hub.ip(&["addr", "add", "10.201.2.1/24", "dev", "h2"]);
    s1.ip(&["addr", "add", "10.201.1.2/24", "dev", "u1"]);
    s2.ip(&["addr", "add", "10.201.2.2/24", "dev", "u2"]);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("tap-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Control sockets live in one global directory: names unique per test run.
    let id = std::process::id() % 10_000;
    let names = [
        format!("{tag}h{id}"),
        format!("{tag}a{id}"),
        format!("{tag}b{id}"),
    ];
    Star {
        lab,
        hub,
        s1,
        s2,
        dir,
        keys: [genkey(), genkey(), genkey()],
        names,
    }
}

impl Star {
    /// The hub's config: both spokes, no endpoints (they call in).
    fn hub_conf(&self, extra_peer1: &str) -> PathBuf {
        let text = format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\nMode = tap\nMAC = 02:00:00:00:00:01\nAddress = 10.88.0.1/24\nAddress = fd88::1/64\n\n\
             [Peer]\nPublicKey = {}\n{extra_peer1}\n[Peer]\nPublicKey = {}\n",
            self.keys[0].0, self.keys[1].1, self.keys[2].1
        );
        write_private(&self.dir, &format!("{}.conf", self.names[0]), &text)
    }

    /// Spoke `i` (1 or 2): the hub is its only peer.
    fn spoke_conf(&self, i: usize, interface_extra: &str) -> PathBuf {
        let text = format!(
            "[Interface]\nPrivateKey = {}\nMode = tap\nMAC = 02:00:00:00:00:0{}\n{interface_extra}\n\n\
             [Peer]\nPublicKey = {}\nEndpoint = 10.201.{i}.1:51820\nPersistentKeepalive = 25\n",
            self.keys[i].0,
            i + 1,
            self.keys[0].1,
        );
        write_private(&self.dir, &format!("{}.conf", self.names[i]), &text)
    }

    fn spoke_addr(i: usize) -> String {
        format!(
            "Address = 10.88.0.{}/24\nAddress = fd88::{}/64",
            i + 1,
            i + 1
        )
    }

    fn start(&self) -> [Proc; 3] {
        let h = run_tapir(&self.hub, &self.hub_conf(""), &self.names[0]);
        let a = run_tapir(
            &self.s1,
            &self.spoke_conf(1, &Self::spoke_addr(1)),
            &self.names[1],
        );
        let b = run_tapir(
            &self.s2,
            &self.spoke_conf(2, &Self::spoke_addr(2)),
            &self.names[2],
        );
        [h, a, b]
    }
}

/// The MAC that `ns` resolved for `addr` (ARP or neighbour discovery).
fn neighbour_mac(ns: &Netns, addr: &str) -> String {
    let v = ns.ip_json(&["neigh", "show", addr]);
    v[0]["lladdr"].as_str().unwrap_or("").to_owned()
}

#[test]
fn spokes_reach_each_other_and_the_hub_over_one_segment() {
    require_root!();
    let star = star("sw");
    let procs = star.start();
    ping_args(&star.s1, &["-c", "3", "-i", "0.2"], "10.88.0.3");
    ping_args(&star.s2, &["-c", "3", "-i", "0.2"], "10.88.0.2");
    ping_args(&star.s1, &["-c", "3", "-i", "0.2"], "10.88.0.1");
    ping_args(&star.s2, &["-c", "3", "-i", "0.2"], "10.88.0.1");
    // Neighbour discovery needs DAD to finish first on fresh addresses.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = star
            .s1
            .cmd("ping")
            .args(["-6", "-c", "1", "-W", "1", "fd88::3"])
            .output()
            .unwrap();
        if out.status.success() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ping_args(&star.s1, &["-6", "-c", "3", "-i", "0.2"], "fd88::3");
    ping_args(&star.s2, &["-6", "-c", "3", "-i", "0.2"], "fd88::1");
    // ARP and neighbour entries name the other side's tap MAC, learned
    // through the hub's switch.
    assert_eq!(neighbour_mac(&star.s1, "10.88.0.3"), "02:00:00:00:00:03");
    assert_eq!(neighbour_mac(&star.s1, "fd88::3"), "02:00:00:00:00:03");
    assert_eq!(neighbour_mac(&star.s2, "10.88.0.1"), "02:00:00:00:00:01");
    // The hub's status lists what it learned per spoke.
    let st = status_json(&star.hub, &star.dir, &star.names[0], &procs[0]);
    assert_eq!(st["mode"], "tap");
    let spoke1 = st["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["public_key"] == star.keys[1].1.as_str())
        .unwrap();
    assert!(
        spoke1["macs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "02:00:00:00:00:02"),
        "{spoke1}"
    );
    let text = status_text(&star.hub, &star.dir, &star.names[0], &procs[0]);
    assert!(
        text.contains("mode: tap") && text.contains("learned MACs:"),
        "{text}"
    );
}

#[test]
fn a_broadcast_reaches_every_member() {
    require_root!();
    let star = star("bc");
    let _procs = star.start();
    ping_args(&star.s1, &["-c", "1"], "10.88.0.3");
    let listen = |ns: &Netns| {
        let path = ns.path();
        std::thread::spawn(move || {
            tapir_sys::netns::enter(&path).unwrap();
            let s = UdpSocket::bind("0.0.0.0:4999").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 64];
            s.recv_from(&mut buf).map(|(n, _)| buf[..n].to_vec()).ok()
        })
    };
    let at_hub = listen(&star.hub);
    let at_s2 = listen(&star.s2);
    std::thread::sleep(Duration::from_millis(300));
    let path = star.s1.path();
    std::thread::spawn(move || {
        tapir_sys::netns::enter(&path).unwrap();
        let s = UdpSocket::bind("10.88.0.2:0").unwrap();
        s.set_broadcast(true).unwrap();
        for _ in 0..3 {
            s.send_to(b"hello, segment", "10.88.0.255:4999").unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .join()
    .unwrap();
    assert_eq!(
        at_hub.join().unwrap().as_deref(),
        Some(&b"hello, segment"[..])
    );
    assert_eq!(
        at_s2.join().unwrap().as_deref(),
        Some(&b"hello, segment"[..])
    );
}

#[test]
fn unicast_between_spokes_bypasses_the_hubs_tap() {
    require_root!();
    let star = star("uc");
    let _procs = star.start();
    ping_args(&star.s1, &["-c", "2", "-i", "0.2"], "10.88.0.3");
    let before = counter(&star.hub, &star.names[0], "rx_packets");
    ping_args(&star.s1, &["-c", "200", "-i", "0.005"], "10.88.0.3");
    let seen = counter(&star.hub, &star.names[0], "rx_packets") - before;
    // 400 frames crossed the hub; a few multicast frames (neighbour
    // discovery, MLD) may reach its tap meanwhile, the unicast must not.
    eprintln!("the hub's tap saw {seen} frames while 400 crossed the hub");
    assert!(seen < 40, "the hub's tap saw {seen} frames of 400");
}

/// Sends `count` Ethernet frames with random source MACs out of `dev` in `ns`.
fn mac_flood(ns: &Netns, dev: &str, count: usize) {
    let script = format!(
        "import os, socket\n\
         s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n\
         s.bind(('{dev}', 0))\n\
         import time\n\
         for i in range({count}):\n\
         \x20   src = bytes([os.urandom(1)[0] & 0xfe | 0x02]) + os.urandom(5)\n\
         \x20   s.send(b'\\xff' * 6 + src + b'\\x88\\xb5' + bytes(46))\n\
         \x20   if i % 100 == 99: time.sleep(0.005)\n"
    );
    let out = ns.cmd("python3").args(["-c", &script]).output().unwrap();
    ok(&out);
}

#[test]
fn a_mac_flood_from_one_spoke_is_capped_and_hurts_no_one() {
    require_root!();
    let star = star("mf");
    let procs = star.start();
    ping_args(&star.s2, &["-c", "2", "-i", "0.2"], "10.88.0.1");
    ping_args(&star.s1, &["-c", "2", "-i", "0.2"], "10.88.0.3");
    let hub_pid = procs[0].0.as_ref().unwrap().id();
    let rss_before = rss_kib(hub_pid);
    mac_flood(&star.s1, &star.names[1], 10_000);
    // The other spoke's ping keeps working, and so does the flooding
    // spoke's own (its station displaced by its flood is learned again),
    // and spoke 2, whose one peer carried the flood, still learns the hub
    // and spoke 1 anew.
    ping_args(&star.s2, &["-c", "5", "-i", "0.2"], "10.88.0.1");
    ping_args(&star.s2, &["-c", "5", "-i", "0.2"], "10.88.0.2");
    ping_args(&star.s1, &["-c", "3", "-i", "0.2"], "10.88.0.3");
    let st = status_json(&star.hub, &star.dir, &star.names[0], &procs[0]);
    let spoke1 = st["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["public_key"] == star.keys[1].1.as_str())
        .unwrap()
        .clone();
    assert_eq!(spoke1["mac_count"], 1024, "{spoke1}");
    let evicted = spoke1["macs_evicted"].as_u64().unwrap_or(0);
    // Paced so that the tap's queue (1000 frames) does not overflow on the
    // spoke; all but a few of the 10,000 reach the hub.
    assert!(evicted >= 9_000 - 1024, "{spoke1}");
    let rss_after = rss_kib(hub_pid);
    eprintln!("MAC flood: {spoke1}; hub RSS {rss_before} -> {rss_after} KiB");
    assert!(
        rss_after < rss_before + 4 * 1024,
        "hub RSS grew from {rss_before} to {rss_after} KiB"
    );
}

#[test]
fn a_vm_behind_a_spokes_bridge_joins_the_segment() {
    require_root!();
    let star = star("br");
    let vm = star.lab.netns("vm");
    let h = run_tapir(&star.hub, &star.hub_conf(""), &star.names[0]);
    let a = run_tapir(
        &star.s1,
        &star.spoke_conf(1, &Star::spoke_addr(1)),
        &star.names[1],
    );
    // Spoke 2 puts its tap on br-tp, which tapir creates; the spoke's own
    // address goes on the bridge, and a "vm" hangs off it by a veth.
    let b = run_tapir(
        &star.s2,
        &star.spoke_conf(2, "Bridge = br-tp"),
        &star.names[2],
    );
    assert!(star.s2.has_link("br-tp"), "tapir created the bridge");
    star.s2.ip(&["addr", "add", "10.88.0.3/24", "dev", "br-tp"]);
    star.lab.veth(&star.s2, "vmport", &vm, "eth0");
    star.s2.ip(&["link", "set", "vmport", "master", "br-tp"]);
    vm.ip(&["addr", "add", "10.88.0.10/24", "dev", "eth0"]);
    ping_args(&vm, &["-c", "3", "-i", "0.2"], "10.88.0.1");
    ping_args(&vm, &["-c", "3", "-i", "0.2"], "10.88.0.2");
    ping_args(&star.s1, &["-c", "3", "-i", "0.2"], "10.88.0.10");
    ping_args(&star.s1, &["-c", "3", "-i", "0.2"], "10.88.0.3");
    drop((h, a));
    let mut b = b;
    b.stop();
    // The VM's port keeps the bridge tapir created: it goes with its last
    // port (what qemu-ifdown, or a down, sees first).
    let vmport = star.s2.ip_json(&["link", "show", "vmport"]);
    assert_eq!(
        vmport[0]["master"], "br-tp",
        "the VM is still on its bridge"
    );
    star.s2.ip(&["link", "del", "vmport"]);
    sh(star.s2.cmd(TAPIR).args(["qemu-ifdown", "vmtap-gone"]));
    assert!(
        !star.s2.has_link("br-tp"),
        "the bridge tapir created goes with its last port"
    );
    // A run that crashed leaves its bridge; the next takes it back as its own.
    let mut b = run_tapir(
        &star.s2,
        &star.spoke_conf(2, "Bridge = br-tp"),
        &star.names[2],
    );
    // (Its tap comes first, its bridge and the record of it a moment
    // later: killed in between, there is no bridge to leave. It answers
    // `wg` once all is set up.)
    wait_for(
        || {
            star.s2
                .cmd("wg")
                .args(["show", &star.names[2]])
                .output()
                .is_ok_and(|o| o.status.success())
        },
        "the tunnel to be set up",
    );
    b.kill();
    wait_for(
        || !star.s2.has_link(&star.names[2]),
        "the tap to go with its process",
    );
    assert!(star.s2.has_link("br-tp"), "left by the crash");
    let mut b = run_tapir(
        &star.s2,
        &star.spoke_conf(2, "Bridge = br-tp"),
        &star.names[2],
    );
    b.stop();
    assert!(
        !star.s2.has_link("br-tp"),
        "the bridge of a run that crashed goes with the next"
    );
    // A start that fails after making the bridge (its own tap still a
    // port then) takes it back.
    let out = star
        .s2
        .cmd(TAPIR)
        .args([
            "run",
            star.spoke_conf(2, "Bridge = br-tp\nPostUp = false")
                .to_str()
                .unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        !star.s2.has_link("br-tp"),
        "a failed start leaves no bridge"
    );
}

#[test]
fn an_existing_bridge_is_joined_and_left_as_it_was() {
    require_root!();
    let star = star("eb");
    star.lab.bridge(&star.s2, "br-own", &[]);
    // A port of the usual 1500 bytes, more than the tunnel's tap carries.
    star.s2.ip(&[
        "link", "add", "dum0", "type", "veth", "peer", "name", "dum1",
    ]);
    star.s2.ip(&["link", "set", "dum0", "master", "br-own"]);
    let mut h = run_tapir(&star.hub, &star.hub_conf(""), &star.names[0]);
    let mut b = run_tapir(
        &star.s2,
        &star.spoke_conf(2, "Bridge = br-own"),
        &star.names[2],
    );
    let link = star.s2.ip_json(&["link", "show", &star.names[2]]);
    assert_eq!(link[0]["master"], "br-own");
    // A port that comes later (a VM's) is named too, once.
    std::thread::sleep(std::time::Duration::from_millis(500));
    star.s2.ip(&[
        "link", "add", "dum2", "type", "veth", "peer", "name", "dum3",
    ]);
    star.s2.ip(&["link", "set", "dum2", "master", "br-own"]);
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let err = b.stop();
    assert!(
        err.contains("warning: the tunnel's tap has MTU 1406, less than the other ports of br-own: dum0 (1500)"),
        "{err}"
    );
    assert_eq!(err.matches("dum2 (1500)").count(), 1, "{err}");
    assert_eq!(err.matches("dum0 (1500)").count(), 1, "{err}");
    assert!(
        star.s2.has_link("br-own"),
        "a bridge tapir did not create stays"
    );
    // And nothing of the run is left in the run directory (an empty
    // `bridges` kept the namespace's directory there).
    let here = std::path::Path::new("/run/tapir").join(netns_dir(&star.s2));
    assert!(!here.exists(), "{} is left", here.display());
    // Without MAC =, the hub's tap has the same MAC at every start (its
    // peers' neighbour caches stay right across a restart).
    h.stop();
    let conf = star.hub_conf("");
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, text.replace("MAC = 02:00:00:00:00:01\n", "")).unwrap();
    let mac = || star.hub.ip_json(&["link", "show", &star.names[0]])[0]["address"].clone();
    let mut h = run_tapir(&star.hub, &conf, &star.names[0]);
    let first = mac();
    h.stop();
    let _h = run_tapir(&star.hub, &conf, &star.names[0]);
    assert_eq!(mac(), first);
    assert_ne!(first, "02:00:00:00:00:01");
}

#[test]
fn spoke_to_spoke_100_mb_and_a_restarted_spoke_resumes() {
    require_root!();
    let star = star("bulk");
    let [_h, a, _b] = star.start();
    ping_args(&star.s1, &["-c", "1"], "10.88.0.3");
    transfer(&star.s1, &star.s2, "10.88.0.3:5001", 100 << 20);
    let mut a = a;
    a.stop();
    let _a = run_tapir(
        &star.s1,
        &star.spoke_conf(1, &Star::spoke_addr(1)),
        &star.names[1],
    );
    let started = Instant::now();
    ping_args(&star.s1, &["-c", "1", "-W", "5"], "10.88.0.3");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "resumed in {:?}",
        started.elapsed()
    );
    transfer(&star.s2, &star.s1, "10.88.0.2:5001", 20 << 20);
}

#[test]
fn a_tun_peer_against_a_tap_hub_is_named_in_status() {
    require_root!();
    let star = star("mm");
    let h = run_tapir(
        &star.hub,
        &star.hub_conf("AllowedIPs = 10.88.0.0/24\n"),
        &star.names[0],
    );
    // Spoke 1 in tun mode, with the hub's subnet routed into its tunnel.
    let text = format!(
        "[Interface]\nPrivateKey = {}\nAddress = 10.88.0.2/24\n\n[Peer]\nPublicKey = {}\nEndpoint = 10.201.1.1:51820\nAllowedIPs = 10.88.0.0/24\n",
        star.keys[1].0, star.keys[0].1
    );
    let conf = write_private(&star.dir, &format!("{}.conf", star.names[1]), &text);
    let _a = run_tapir(&star.s1, &conf, &star.names[1]);
    let _ = star
        .s1
        .cmd("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "1", "10.88.0.1"])
        .output();
    let text = status_text(&star.hub, &star.dir, &star.names[0], &h);
    assert!(
        text.contains("of the other mode (tun/tap)") && text.contains("is it in tun mode?"),
        "{text}"
    );
}
