//! Networks for VMs: NAT for a guest subnet, reversible, in namespaces.
//!
//! ```text
//!   g ("guest") 192.168.77.2 ── 192.168.77.1 h ("host") 10.213.0.1 ── 10.213.0.2 i ("internet")
//! ```

mod support;

use std::path::Path;

use netlab::{Netns, require_root};
use support::*;

fn ruleset(ns: &Netns) -> String {
    let out = ns
        .cmd("nft")
        .args(["-j", "list", "ruleset"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sysctl(ns: &Netns, key: &str) -> String {
    let out = ns.cmd("sysctl").args(["-n", key]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Packets counted by a rule of table `inet watch` in `ns`, by its comment.
fn counted(ns: &Netns, comment: &str) -> u64 {
    let out = ns
        .cmd("nft")
        .args(["-j", "list", "table", "inet", "watch"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["rule"]["comment"] == comment)
        .flat_map(|i| i["rule"]["expr"].as_array().cloned().unwrap_or_default())
        .find_map(|e| e["counter"]["packets"].as_u64())
        .unwrap()
}

#[test]
fn nat_lets_a_guest_out_as_the_host_and_disable_leaves_everything_as_before() {
    require_root!();
    let bed = bed("nat");
    let lab = &bed.lab;
    let (g, h) = (&bed.a, &bed.b);
    let i = lab.netns("i");
    // The bed's underlay is the guest's link here.
    g.ip(&["addr", "add", "192.168.77.2/24", "dev", "va"]);
    h.ip(&["addr", "add", "192.168.77.1/24", "dev", "vb"]);
    g.ip(&["route", "add", "default", "via", "192.168.77.1"]);
    lab.veth(h, "vhi", &i, "vi");
    h.ip(&["addr", "add", "10.213.0.1/24", "dev", "vhi"]);
    i.ip(&["addr", "add", "10.213.0.2/24", "dev", "vi"]);
    // Another table in the host's ruleset, which tapir must leave alone.
    nft(
        h,
        "table ip mine {\n chain c {\n  type filter hook input priority 0; policy accept\n }\n}\n",
    );
    nft(
        &i,
        "table inet watch {\n chain in {\n  type filter hook input priority 0\n  ip saddr 10.213.0.1 icmp type echo-request counter comment \"host\"\n  ip saddr 192.168.77.0/24 counter comment \"guest\"\n }\n}\n",
    );
    let (rules_before, fwd_before) = (ruleset(h), sysctl(h, "net.ipv4.ip_forward"));
    assert_eq!(fwd_before, "0", "a fresh namespace does not forward");
    // One interface forwards on its own: the global switch overwrites it,
    // and disable must put it back.
    h.cmd("sysctl")
        .args(["-qw", "net.ipv4.conf.vb.forwarding=1"])
        .status()
        .unwrap();
    let dir = &bed.dir;
    let enable = [
        "nat",
        "enable",
        "--source",
        "192.168.77.0/24",
        "--out",
        "vhi",
    ];
    let out = ok(&tapir_in(h, dir, &enable));
    assert!(out.contains("nat enabled"), "{out}");
    let after_one = ruleset(h);
    // Twice: nothing changes.
    let out = ok(&tapir_in(h, dir, &enable));
    assert!(
        out.contains("already enabled") && out.contains("nothing changed"),
        "{out}"
    );
    assert_eq!(ruleset(h), after_one);
    ping(g, "10.213.0.2");
    assert!(
        counted(&i, "host") > 0,
        "the internet sees the host's address"
    );
    assert_eq!(counted(&i, "guest"), 0, "the guest's address never leaves");
    let st = ok(&tapir_in(h, dir, &["nat", "status", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&st).unwrap();
    assert_eq!(v["entries"][0]["source"], "192.168.77.0/24");
    assert_eq!(v["entries"][0]["out"], "vhi");
    assert_eq!(v["ipv4_forwarding"], true);
    let out = ok(&tapir_in(
        h,
        dir,
        &[
            "nat",
            "disable",
            "--source",
            "192.168.77.0/24",
            "--out",
            "vhi",
        ],
    ));
    assert!(out.contains("nat disabled"), "{out}");
    assert_eq!(ruleset(h), rules_before, "the ruleset is as before");
    assert_eq!(sysctl(h, "net.ipv4.ip_forward"), fwd_before);
    assert_eq!(
        sysctl(h, "net.ipv4.conf.vb.forwarding"),
        "1",
        "vb's own setting"
    );
    assert_eq!(sysctl(h, "net.ipv4.conf.vhi.forwarding"), "0");
    // An interface that is not there (yet): accepted, and said.
    let out = tapir_in(
        h,
        dir,
        &[
            "nat",
            "enable",
            "--source",
            "192.168.78.0/24",
            "--out",
            "nosuch0",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("warning: no interface nosuch0 here (yet)"),
        "{err}"
    );
    ok(&tapir_in(h, dir, &["nat", "disable"]));
    // Disabling what is not enabled says so, and succeeds.
    let out = ok(&tapir_in(h, dir, &["nat", "disable"]));
    assert!(out.contains("was not enabled"), "{out}");
    // IPv6: the same for a guest prefix, with IPv6 forwarding.
    g.ip(&["addr", "add", "fd77::2/64", "dev", "va", "nodad"]);
    h.ip(&["addr", "add", "fd77::1/64", "dev", "vb", "nodad"]);
    g.ip(&["-6", "route", "add", "default", "via", "fd77::1"]);
    h.ip(&["addr", "add", "fd13::1/64", "dev", "vhi", "nodad"]);
    i.ip(&["addr", "add", "fd13::2/64", "dev", "vi", "nodad"]);
    nft(
        &i,
        "table inet watch6 {\n chain in {\n  type filter hook input priority 0\n  ip6 saddr fd13::1 icmpv6 type echo-request counter comment \"host6\"\n }\n}\n",
    );
    let fwd6_before = sysctl(h, "net.ipv6.conf.all.forwarding");
    let enable6 = ["nat", "enable", "--source", "fd77::/64", "--out", "vhi"];
    ok(&tapir_in(h, dir, &enable6));
    assert_eq!(sysctl(h, "net.ipv6.conf.all.forwarding"), "1");
    ping_args(g, &["-6", "-c", "3", "-i", "0.2"], "fd13::2");
    let out = i
        .cmd("nft")
        .args(["list", "table", "inet", "watch6"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("packets 0 "),
        "the internet sees the host's IPv6 address: {text}"
    );
    ok(&tapir_in(h, dir, &["nat", "disable"]));
    assert_eq!(sysctl(h, "net.ipv6.conf.all.forwarding"), fwd6_before);
    assert_eq!(ruleset(h), rules_before);
}

/// The links QEMU's script= and downscript= point at.
fn qemu_links(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (up, down) = (dir.join("tapir-qemu-ifup"), dir.join("tapir-qemu-ifdown"));
    for l in [&up, &down] {
        let _ = std::fs::remove_file(l);
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_tapir"), l).unwrap();
    }
    (up, down)
}

/// A real QEMU guest without disk or KVM, booting from the network (its
/// iPXE ROM DHCPs), its tap set up and taken down by tapir's links, with
/// `env` for them.
fn qemu(h: &Netns, dir: &Path, tap: &str, mac: &str, env: &[(&str, &str)]) -> Proc {
    let (up, down) = qemu_links(dir);
    let mut cmd = h.cmd("qemu-system-x86_64");
    cmd.args([
        "-nodefaults",
        "-display",
        "none",
        "-m",
        "64",
        "-boot",
        "n",
        "-no-reboot",
        "-netdev",
    ])
    .arg(format!(
        "tap,id=n0,ifname={tap},script={},downscript={}",
        up.display(),
        down.display()
    ))
    .args(["-device", &format!("e1000,netdev=n0,mac={mac}")])
    .env("TAPIR_RUN_DIR", dir.join("run"))
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc(Some(cmd.spawn().expect(
        "qemu-system-x86_64 (Debian packages qemu-system-x86 and ipxe-qemu)",
    )))
}

#[test]
fn qemu_ifup_puts_taps_on_a_bridge_it_creates_and_ifdown_takes_it_back() {
    require_root!();
    let bed = bed("qif");
    let h = &bed.b;
    let dir = &bed.dir;
    let (up, down) = qemu_links(dir);
    // As QEMU calls them: the tap's name only, the rest from the environment.
    let run = |link: &Path, tap: &str| {
        let out = h
            .cmd(link)
            .arg(tap)
            .env("TAPIR_QEMU_BRIDGE", "br77")
            .env("TAPIR_QEMU_ADDR", "192.168.77.1/24")
            .env("TAPIR_RUN_DIR", dir.join("run"))
            .output()
            .unwrap();
        ok(&out);
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    for t in ["qtap0", "qtap1"] {
        h.ip(&["tuntap", "add", "dev", t, "mode", "tap"]);
    }
    let out = run(&up, "qtap0");
    assert!(
        out.contains("created bridge br77 with 192.168.77.1/24"),
        "{out}"
    );
    run(&up, "qtap1");
    let master = |t: &str| h.ip_json(&["link", "show", t])[0]["master"].clone();
    assert_eq!(master("qtap0"), "br77");
    assert_eq!(master("qtap1"), "br77");
    assert!(h.ip(&["addr", "show", "br77"]).contains("192.168.77.1/24"));
    run(&down, "qtap0");
    assert!(master("qtap0").is_null(), "off the bridge");
    assert!(h.has_link("br77"), "the bridge stays while it has a port");
    run(&down, "qtap1");
    assert!(
        !h.has_link("br77"),
        "the bridge tapir made goes with its last port"
    );
    // Made without --addr, given one by a later ifup: tapir's bridge, so it
    // takes it (a warning said the bridge "was there before").
    let ifup = |tap: &str, addr: Option<&str>| {
        let mut c = h.cmd(&up);
        c.arg(tap)
            .env("TAPIR_QEMU_BRIDGE", "br79")
            .env("TAPIR_RUN_DIR", dir.join("run"));
        if let Some(a) = addr {
            c.env("TAPIR_QEMU_ADDR", a);
        }
        let out = c.output().unwrap();
        ok(&out);
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let out = ifup("qtap0", None);
    assert!(out.contains("created bridge br79\n"), "{out}");
    let out = ifup("qtap1", Some("192.168.79.1/24"));
    assert!(
        out.contains("put 192.168.79.1/24 on br79 (tapir created it)") && !out.contains("warning"),
        "{out}"
    );
    assert!(h.ip(&["addr", "show", "br79"]).contains("192.168.79.1/24"));
    // Another address for it, or a subnet the host uses: refused (they
    // were stacked on the bridge; two held the host's own subnet).
    for (bridge, addr, want) in [
        (
            "br79",
            "192.168.80.1/24",
            "br79 has 192.168.79.1/24 already",
        ),
        (
            "br81",
            "10.200.0.9/24",
            "10.200.0.0/24 is in use here (10.200.0.2/24 on vb)",
        ),
    ] {
        let out = h
            .cmd(&up)
            .arg("qtap0")
            .env("TAPIR_QEMU_BRIDGE", bridge)
            .env("TAPIR_QEMU_ADDR", addr)
            .env("TAPIR_RUN_DIR", dir.join("run"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{err}");
    }
    assert!(!h.ip(&["addr", "show", "br79"]).contains("192.168.80.1"));
    assert!(!h.has_link("br81"));
    for t in ["qtap0", "qtap1"] {
        h.cmd(&down)
            .arg(t)
            .env("TAPIR_RUN_DIR", dir.join("run"))
            .status()
            .unwrap();
    }
    assert!(!h.has_link("br79"));
    // A bridge that was there before is left there.
    h.ip(&["link", "add", "br88", "type", "bridge"]);
    let out = h
        .cmd(&up)
        .arg("qtap0")
        .env("TAPIR_QEMU_BRIDGE", "br88")
        .env("TAPIR_RUN_DIR", dir.join("run"))
        .output()
        .unwrap();
    assert!(out.status.success());
    h.cmd(&down)
        .arg("qtap0")
        .env("TAPIR_RUN_DIR", dir.join("run"))
        .status()
        .unwrap();
    assert!(h.has_link("br88"), "not ours: left alone");
    // --addr for a bridge that was there: not put on it, and said so.
    let out = h
        .cmd(&up)
        .arg("qtap0")
        .env("TAPIR_QEMU_BRIDGE", "br88")
        .env("TAPIR_QEMU_ADDR", "192.168.88.1/24")
        .env("TAPIR_RUN_DIR", dir.join("run"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("warning: --addr 192.168.88.1/24 not put on br88"),
        "{err}"
    );
    // Not a tap (a typo for the tap's name): refused, nothing changed, no
    // bridge made for it.
    let tapir = |args: &[&str]| {
        h.cmd(env!("CARGO_BIN_EXE_tapir"))
            .args(args)
            .env("TAPIR_RUN_DIR", dir.join("run"))
            .output()
            .unwrap()
    };
    for args in [
        &["qemu-ifdown", "lo"][..],
        &["qemu-ifup", "lo", "--bridge", "br89"],
    ] {
        let out = tapir(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("lo is not a tap device"),
            "{args:?}: {err}"
        );
    }
    assert!(h.ip(&["link", "show", "lo"]).contains(",UP"), "lo left up");
    assert!(!h.has_link("br89"));
    // A tun device cannot be a bridge's port: the bridge made for it goes.
    h.ip(&["tuntap", "add", "dev", "qtun0", "mode", "tun"]);
    let out = tapir(&["qemu-ifup", "qtun0", "--bridge", "br90"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("qtun0 cannot be a port of br90"),
        "{err}"
    );
    assert!(!h.has_link("br90"), "the bridge made for it went");
    // Without a bridge: the seed's form, the address on the tap itself.
    let out = h
        .cmd(env!("CARGO_BIN_EXE_tapir"))
        .args(["qemu-ifup", "qtap1", "--addr", "10.0.66.1/24"])
        .env("TAPIR_RUN_DIR", dir.join("run"))
        .output()
        .unwrap();
    ok(&out);
    assert!(h.ip(&["addr", "show", "qtap1"]).contains("10.0.66.1/24"));
    // And down takes it off again (with the same settings QEMU's
    // downscript= gets: it stayed on a persistent tap).
    let out = h
        .cmd(env!("CARGO_BIN_EXE_tapir"))
        .args(["qemu-ifdown", "qtap1"])
        .env("TAPIR_QEMU_ADDR", "10.0.66.1/24")
        .env("TAPIR_RUN_DIR", dir.join("run"))
        .output()
        .unwrap();
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("10.0.66.1/24 off qtap1"));
    assert!(!h.ip(&["addr", "show", "qtap1"]).contains("10.0.66.1"));
}

#[test]
fn a_real_qemu_guest_dhcps_on_the_bridge_and_leaves_nothing() {
    require_root!();
    let bed = bed("qemu");
    let h = &bed.b;
    let dir = &bed.dir;
    let mut qemu = qemu(
        h,
        dir,
        "qtap9",
        "52:54:00:12:34:98",
        &[
            ("TAPIR_QEMU_BRIDGE", "br99"),
            ("TAPIR_QEMU_ADDR", "192.168.99.1/24"),
        ],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !h.has_link("br99") {
        assert!(
            std::time::Instant::now() < deadline,
            "script= never made the bridge"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // iPXE, booting from the network, asks for an address: seen on the bridge.
    let seen = h
        .cmd("timeout")
        .args([
            "90", "tcpdump", "-i", "br99", "-n", "-c", "1", "udp", "port", "67",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&seen.stdout);
    assert!(
        text.contains("0.0.0.0.68 > 255.255.255.255.67") && text.contains("BOOTP/DHCP"),
        "no DHCP request on br99: {text}{}",
        String::from_utf8_lossy(&seen.stderr)
    );
    // QEMU ends: its downscript takes the tap off, the bridge goes with it.
    qemu.stop();
    assert!(!h.has_link("qtap9"), "the tap went with QEMU");
    assert!(
        !h.has_link("br99"),
        "the bridge tapir made went with its last port"
    );
}

#[test]
fn a_real_qemu_guest_gets_its_address_from_guest_net_and_down_leaves_nothing() {
    require_root!();
    let bed = bed("gnet");
    let h = &bed.b;
    let dir = &bed.dir;
    let rules_before = ruleset(h);
    let gnet = |args: &[&str]| tapir_in(h, dir, args);
    let out = ok(&gnet(&[
        "guest-net",
        "up",
        "gnet0",
        "--subnet",
        "192.168.99.0/24",
        "--out",
        "vb",
        "--dns",
        "192.0.2.53",
    ]));
    assert!(
        out.contains("bridge gnet0 with 192.168.99.1/24")
            && out.contains("DHCP on gnet0")
            && out.contains("name servers 192.0.2.53"),
        "{out}"
    );
    let mac = || h.ip_json(&["link", "show", "gnet0"])[0]["address"].clone();
    let bridge_mac = mac();
    let again = ok(&gnet(&[
        "guest-net",
        "up",
        "gnet0",
        "--subnet",
        "192.168.99.0/24",
        "--out",
        "vb",
    ]));
    assert!(again.contains("already up"), "{again}");
    // Asked otherwise while up: the difference named, nothing changed (the
    // new subnet was dropped unsaid, "nothing changed").
    let out = gnet(&[
        "guest-net",
        "up",
        "gnet0",
        "--subnet",
        "192.168.98.0/24",
        "--out",
        "vb",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("not as asked: its subnet is 192.168.99.0/24, not 192.168.98.0/24"),
        "{err}"
    );
    // Another on a subnet in use, a guest network's or the host's own
    // link's: refused, naming what holds it (two bridges held 192.168.99.1/24).
    for (subnet, holder) in [
        ("192.168.99.128/25", "192.168.99.1/24 on gnet0"),
        ("10.200.0.0/16", "10.200.0.2/24 on vb"),
    ] {
        let out = gnet(&["guest-net", "up", "gnet1", "--subnet", subnet]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(&format!("is in use here ({holder})")),
            "{subnet}: {err}"
        );
        assert!(!h.has_link("gnet1"));
    }
    // A route around the subnet (a VPN's half of everything, a wider
    // network elsewhere) leaves it free; one into it does not.
    h.ip(&["route", "add", "172.16.0.0/12", "via", "10.200.0.1"]);
    h.ip(&["route", "add", "172.21.5.0/24", "via", "10.200.0.1"]);
    ok(&gnet(&[
        "guest-net",
        "up",
        "gnet1",
        "--subnet",
        "172.20.0.0/24",
    ]));
    ok(&gnet(&["guest-net", "down", "gnet1"]));
    let out = gnet(&["guest-net", "up", "gnet1", "--subnet", "172.21.0.0/16"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("(the route 172.21.5.0/24 via 10.200.0.1 dev vb)"),
        "{err}"
    );
    assert!(!h.has_link("gnet1"));
    let mut qemu = qemu(
        h,
        dir,
        "qtap8",
        "52:54:00:12:34:99",
        &[("TAPIR_QEMU_BRIDGE", "gnet0")],
    );
    // iPXE completes DHCP: a bound lease for the guest's MAC, in the subnet.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let lease = loop {
        let st: serde_json::Value =
            serde_json::from_str(&ok(&gnet(&["guest-net", "status", "gnet0", "--json"]))).unwrap();
        let found = st["leases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["mac"] == "52:54:00:12:34:99" && l["bound"] == true)
            .cloned();
        if let Some(l) = found {
            assert_eq!(st["dhcp_running"], true);
            break l;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no lease for the guest: {st}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let ip: std::net::Ipv4Addr = lease["ip"].as_str().unwrap().parse().unwrap();
    assert_eq!(&ip.octets()[..3], &[192, 168, 99], "{lease}");
    assert_ne!(ip.octets()[3], 1, "not the bridge's own address");
    let text = ok(&gnet(&["guest-net", "status", "gnet0"]));
    assert!(
        text.contains(&format!("{ip} 52:54:00:12:34:99 bound")),
        "{text}"
    );
    assert_eq!(mac(), bridge_mac, "the guests' gateway keeps its MAC");
    qemu.stop();
    assert_eq!(mac(), bridge_mac, "with no port too");
    // Its DHCP server gone: up says what to do.
    let st: serde_json::Value =
        serde_json::from_str(&ok(&gnet(&["guest-net", "status", "gnet0", "--json"]))).unwrap();
    let pid = st["state"]["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the DHCP server outlived SIGKILL"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = gnet(&["guest-net", "up", "gnet0", "--subnet", "192.168.99.0/24"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("take it down first (tapir guest-net down gnet0)"),
        "{err}"
    );
    let out = ok(&gnet(&["guest-net", "down", "gnet0"]));
    assert!(out.contains("bridge gnet0 removed"), "{out}");
    assert!(!h.has_link("gnet0") && !h.has_link("qtap8"));
    assert_eq!(ruleset(h), rules_before, "NAT taken back");
    let pids = std::process::Command::new("ip")
        .args(["netns", "pids", h.name()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&pids.stdout).trim().is_empty(),
        "a process is left"
    );
}
