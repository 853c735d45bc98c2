//! `tapir explain`: in each situation a learner meets, the right cause is
//! named, and the JSON carries the facts used.

mod support;

use netlab::{Netns, require_root};
use support::*;

fn explain(ns: &Netns, what: &str) -> (String, serde_json::Value) {
    let run = |json: bool| {
        let mut c = ns.cmd(env!("CARGO_BIN_EXE_tapir"));
        c.args(["explain", what]);
        if json {
            c.arg("--json");
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    (run(false), serde_json::from_str(&run(true)).unwrap())
}

#[test]
fn explain_names_the_cause_in_each_situation() {
    require_root!();
    let bed = bed("expl");
    let a = &bed.a;
    a.ip(&["tuntap", "add", "dev", "tun0", "mode", "tun"]);
    a.ip(&["addr", "add", "10.0.0.1/24", "dev", "tun0"]);
    a.ip(&["link", "set", "tun0", "up"]);
    // The device's own address: local, answered through lo.
    let (text, json) = explain(a, "10.0.0.1");
    assert!(
        text.contains("is an address of this host") && text.contains("through lo"),
        "{text}"
    );
    assert_eq!(json["facts"]["route"]["kind"], "local");
    // Another address of the subnet: routed into tun0, which nobody holds.
    let (text, json) = explain(a, "10.0.0.2");
    assert!(
        text.contains("routed out of tun0") && text.contains("no process holds"),
        "{text}"
    );
    assert_eq!(json["facts"]["route"]["device"], "tun0");
    assert_eq!(json["facts"]["device"]["open"], false);
    let (text, _) = explain(a, "tun0");
    assert!(
        text.contains("no process holds it") && text.contains("tcpdump on it shows nothing"),
        "{text}"
    );
    // A reader attached: named, with its pid.
    let mut echo = Proc(Some(
        a.cmd(env!("CARGO_BIN_EXE_tapir"))
            .args(["echo", "tun0"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    ));
    let pid = echo.0.as_ref().unwrap().id();
    wait_for(
        || {
            a.ip_json(&["link", "show", "tun0"])[0]["flags"]
                .as_array()
                .unwrap()
                .iter()
                .all(|f| f != "NO-CARRIER")
        },
        "the echo program to attach",
    );
    let (text, json) = explain(a, "10.0.0.2");
    assert!(
        text.contains(&format!("held by tapir (pid {pid})")),
        "{text}"
    );
    assert_eq!(json["facts"]["device"]["holders"][0]["pid"], pid);
    let list = a
        .cmd(env!("CARGO_BIN_EXE_tapir"))
        .args(["dev", "list"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).contains(&format!("yes by tapir({pid})")));
    echo.stop();
    // Down.
    a.ip(&["link", "set", "tun0", "down"]);
    let (text, _) = explain(a, "tun0");
    assert!(text.contains("it is down"), "{text}");
    // No route at all (a namespace without a default route).
    let (text, json) = explain(a, "192.0.2.99");
    assert!(text.contains("no route to 192.0.2.99"), "{text}");
    assert!(json["facts"]["route"].is_null());
    // Routed elsewhere: out of the veth, no tun/tap in the way.
    let (text, json) = explain(a, "10.200.0.2");
    assert!(text.contains("routed out of va"), "{text}");
    assert!(json["facts"]["device"].is_null());
    // A VM subnet behind a bridge, no forwarding: the guests cannot get out.
    a.ip(&["link", "add", "br5", "type", "bridge"]);
    a.ip(&["addr", "add", "192.168.5.1/24", "dev", "br5"]);
    a.ip(&["route", "add", "default", "via", "10.200.0.2"]);
    let (text, json) = explain(a, "198.51.100.1");
    assert!(
        text.contains(
            "forwarding is off on this host: guests on br5 (192.168.5.0/24) reach the host only"
        ) && text.contains("tapir nat enable --source 192.168.5.0/24 --out va"),
        "{text}"
    );
    assert_eq!(json["facts"]["guests"]["forwarding"], false);
    // A tapir tunnel: the peer that covers the address, never handshaken.
    let (kb, pb) = genkey();
    let (ka, pa) = genkey();
    let side = Side {
        ns: a,
        name: ifname("ext"),
        port: 51899,
        addr: "10.78.0.1",
    };
    let _t = tapir(
        &bed,
        &side,
        &ka,
        &pb,
        Some("10.200.0.2:51899"),
        "10.78.0.0/24",
    );
    let (text, json) = explain(a, "10.78.0.9");
    assert!(
        text.contains("is a tapir tunnel")
            && text.contains("never completed a handshake")
            && text.contains(&pb),
        "{text}"
    );
    assert_eq!(json["facts"]["tunnel"]["allowed_ip"], "10.78.0.0/24");
    // And once the other end answers: its latest handshake.
    let b = Side {
        ns: &bed.b,
        name: ifname("exb"),
        port: 51899,
        addr: "10.78.0.2",
    };
    let _tb = tapir(&bed, &b, &kb, &pa, None, "10.78.0.1/32");
    // The first initiation went before b was there: the retry comes within 5 s.
    first_reply(a, "10.78.0.2", std::time::Duration::from_secs(15));
    let (text, _) = explain(a, "10.78.0.2");
    assert!(
        text.contains("latest handshake") && !text.contains("never"),
        "{text}"
    );
    // A tap-mode tunnel is an Ethernet segment: frames go by MAC, and
    // allowed IPs (none here) are no routes (it said the tunnel drops what
    // no peer's allowed IPs cover, and to add them, which cut the peer off).
    let tap = ifname("exq");
    let file = write_private(
        &bed.dir,
        &format!("{tap}.conf"),
        &format!(
            "[Interface]\nPrivateKey = {}\nMode = tap\nAddress = 10.79.0.1/24\n\n[Peer]\nPublicKey = {}\nEndpoint = 10.200.0.2:51898\n",
            genkey().0,
            genkey().1
        ),
    );
    let _t = run_tapir(a, &file, &tap);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let (text, json) = explain(a, "10.79.0.7");
        if json["facts"]["tunnel"]["mode"] == "tap" {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(
        text.contains("in tap mode") && !text.contains("drops") && !text.contains("allowed-ips"),
        "{text}"
    );
}

#[test]
fn explain_names_the_headers_a_reader_gets_and_a_tunnel_mtu_too_large() {
    require_root!();
    let bed = bed("exph");
    let a = &bed.a;
    // A reader that opened the device without IFF_NO_PI (as the seed
    // programs do when they forget it): each read has 4 bytes more.
    a.ip(&["tuntap", "add", "dev", "tun7", "mode", "tun"]);
    let mut holder = a.cmd("python3");
    holder.args([
        "-c",
        "import fcntl, os, struct, sys, time\n\
         fd = os.open('/dev/net/tun', os.O_RDWR)\n\
         fcntl.ioctl(fd, 0x400454ca, struct.pack('16sH', b'tun7', 0x0001))\n\
         print('open', flush=True)\n\
         time.sleep(60)\n",
    ]);
    holder.stdout(std::process::Stdio::piped());
    let mut holder = Proc(Some(holder.spawn().unwrap()));
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.0.as_mut().unwrap().stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "open");
    let (text, json) = explain(a, "tun7");
    assert!(
        text.contains("packet information is on: each read starts with 4 more bytes"),
        "{text}"
    );
    assert!(!text.contains("the vnet header is on"), "{text}");
    assert_eq!(json["facts"]["pi"], true);
    drop(holder);
    // A tapir tunnel reads with the vnet header; given a 1500-byte MTU it
    // is told that large packets will not fit through a 1500-byte path.
    let (ka, _) = genkey();
    let (_, pb) = genkey();
    let side = Side {
        ns: a,
        name: ifname("exm"),
        port: 51898,
        addr: "10.79.0.1",
    };
    let _t = tapir(&bed, &side, &ka, &pb, None, "10.79.0.2/32");
    let (text, _) = explain(a, &side.name);
    assert!(text.contains("the vnet header is on"), "{text}");
    assert!(
        !text.contains("is larger than a WireGuard tunnel"),
        "{text}"
    );
    a.ip(&["link", "set", &side.name, "mtu", "1500"]);
    let (text, _) = explain(a, &side.name);
    assert!(
        text.contains(
            "its MTU 1500 is larger than a WireGuard tunnel over a 1500-byte path carries (1420)"
        ),
        "{text}"
    );
}

/// Routes of other kinds and policy rules: each named for what it does,
/// the table that decided named too; links that are not tun/tap
/// explained, not refused; lo down named where a local address needs it.
#[test]
fn explain_names_route_kinds_policy_tables_and_other_links() {
    require_root!();
    let bed = bed("exk");
    let a = &bed.a;
    a.ip(&["route", "add", "blackhole", "10.61.0.0/16"]);
    a.ip(&["route", "add", "prohibit", "10.62.0.0/16"]);
    a.ip(&["route", "add", "unreachable", "10.60.0.0/16"]);
    for (addr, words) in [
        (
            "10.61.1.1",
            "blackhole route (10.61.0.0/16 in table 254): packets to it are dropped silently",
        ),
        (
            "10.62.1.1",
            "prohibit route (10.62.0.0/16 in table 254): packets to it are refused",
        ),
        (
            "10.60.1.1",
            "unreachable route (10.60.0.0/16 in table 254): packets to it are refused (the sender gets \"No route to host\")",
        ),
    ] {
        let (text, json) = explain(a, addr);
        assert!(text.contains(words), "{addr}: {text}");
        assert_ne!(json["facts"]["route"], serde_json::Value::Null);
    }
    // A policy rule sends 10.70.0.0/16 to table 100, out of the veth.
    a.ip(&["route", "add", "10.70.0.0/16", "dev", "va", "table", "100"]);
    a.ip(&["rule", "add", "to", "10.70.0.0/16", "table", "100"]);
    let (text, json) = explain(a, "10.70.1.1");
    assert!(
        text.contains("routed out of va (table 100, chosen by a policy rule"),
        "{text}"
    );
    assert_eq!(json["facts"]["route"]["table"], 100);
    // The subnet's broadcast address is sent, not refused.
    let (text, _) = explain(a, "10.200.0.255");
    assert!(text.contains("is a broadcast address"), "{text}");
    // A veth and lo are explained.
    let (text, json) = explain(a, "va");
    assert!(
        text.contains("va is a veth link, up") && text.contains("10.200.0.1/24"),
        "{text}"
    );
    assert_eq!(json["facts"]["kind"], "veth");
    // lo down: a local address is not answered, and that is said.
    a.ip(&["link", "set", "lo", "down"]);
    let (text, _) = explain(a, "10.200.0.1");
    assert!(
        text.contains("lo is down") && text.contains("ip link set lo up"),
        "{text}"
    );
    let (text, _) = explain(a, "lo");
    assert!(text.contains("lo is a loopback link, down"), "{text}");
    // ...and a loopback address has no route at all then.
    let (text, _) = explain(a, "127.0.0.1");
    assert!(
        text.contains("lo is down") && text.contains("ip link set lo up"),
        "{text}"
    );
    a.ip(&["link", "set", "lo", "up"]);
}

/// `tapir explain WHAT` that fails: its message.
fn refused(ns: &Netns, what: &str) -> String {
    let out = ns
        .cmd(env!("CARGO_BIN_EXE_tapir"))
        .args(["explain", what])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{what} was taken");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn explain_tells_rules_paths_zones_ports_and_down_links_as_the_kernel_does() {
    require_root!();
    let bed = bed("exr");
    let a = &bed.a;
    // A policy rule that refuses, not a route: the rule is named.
    a.ip(&[
        "rule",
        "add",
        "to",
        "10.63.0.0/16",
        "prohibit",
        "pref",
        "100",
    ]);
    a.ip(&[
        "rule",
        "add",
        "to",
        "10.64.0.0/16",
        "unreachable",
        "pref",
        "101",
    ]);
    let (text, _) = explain(a, "10.63.1.1");
    assert!(
        text.contains("a policy rule refuses it") && text.contains("ip rule del pref 100"),
        "{text}"
    );
    let (text, _) = explain(a, "10.64.1.1");
    assert!(
        text.contains("a policy rule refuses it") && text.contains("ip rule del pref 101"),
        "{text}"
    );
    // Two paths: said to be one of them; each device lists the route.
    a.ip(&[
        "link", "add", "exv0", "type", "veth", "peer", "name", "exv1",
    ]);
    a.ip(&["addr", "add", "10.66.0.1/24", "dev", "exv0"]);
    a.ip(&["link", "set", "exv0", "up"]);
    a.ip(&["link", "set", "exv1", "up"]);
    a.ip(&[
        "route",
        "add",
        "192.0.2.0/24",
        "nexthop",
        "via",
        "10.200.0.2",
        "dev",
        "va",
        "nexthop",
        "via",
        "10.66.0.2",
        "dev",
        "exv0",
    ]);
    let (text, _) = explain(a, "192.0.2.9");
    assert!(text.contains("one of the 2 paths"), "{text}");
    let (text, _) = explain(a, "exv0");
    assert!(
        text.contains("192.0.2.0/24 via 10.66.0.2 (one path of several)"),
        "{text}"
    );
    // A route in another table (wg-quick's) is listed with its table.
    a.ip(&["route", "add", "default", "dev", "exv0", "table", "51821"]);
    let (text, _) = explain(a, "exv0");
    assert!(text.contains("default (table 51821)"), "{text}");
    // Forms that are not an address or a device.
    assert!(refused(a, "10.66.0.0/24").contains("is a subnet"));
    assert!(refused(a, "10.66.0.1:80").contains("has a port"));
    assert!(refused(a, "fe80::1%nosuch").contains("no link named nosuch"));
    // Link-local: without its zone it names no link; with it, the route.
    let (text, _) = explain(a, "fe80::1");
    assert!(text.contains("means nothing without the link"), "{text}");
    let (text, _) = explain(a, "fe80::1%exv0");
    assert!(text.contains("routed out of exv0"), "{text}");
    // IPv4 written as IPv6.
    let (text, _) = explain(a, "::ffff:10.66.0.5");
    assert!(
        text.contains("the IPv4 address 10.66.0.5") && text.contains("routed out of exv0"),
        "{text}"
    );
    // A down tap with an address: nothing routed into it, its address the host's still.
    a.ip(&["tuntap", "add", "dev", "ext0", "mode", "tap"]);
    a.ip(&["addr", "add", "10.67.0.1/24", "dev", "ext0"]);
    let (text, _) = explain(a, "ext0");
    assert!(
        text.contains("it is down: nothing is routed into it")
            && !text.contains("routed into ext0")
            && !text.contains("but its addresses' own subnets"),
        "{text}"
    );
    let (text, _) = explain(a, "10.67.0.1");
    assert!(
        text.contains("ext0 is down: the host still answers") && !text.contains("ping 10.67.0.2"),
        "{text}"
    );
    // A bridge port: its addresses are not reached from the link.
    a.ip(&["link", "add", "exbr", "type", "bridge"]);
    a.ip(&["link", "set", "ext0", "master", "exbr"]);
    let (text, _) = explain(a, "ext0");
    assert!(
        text.contains("it is a port of exbr") && text.contains("put them on exbr"),
        "{text}"
    );
    a.ip(&["link", "del", "ext0"]);
}
