//! A VPN client as wg-quick users expect it: every route through the
//! tunnel by policy routing, hooks, DNS through resolvconf, SaveConfig;
//! and after down (or a crash and down) the routing exactly as before.
//!
//! ```text
//!   a (client) 10.200.0.1 ── underlay ── 10.200.0.2 b (server) 10.212.0.1 ── 10.212.0.2 i ("internet")
//!   10.79.0.2  ═══════════ tapir, AllowedIPs = 0.0.0.0/0, ::/0 ═══ 10.79.0.1   forwards, masquerades
//! ```

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use netlab::{Netns, require_root};
use support::*;

/// Every rule and every route of every table, both families.
fn routing(ns: &Netns) -> String {
    [
        &["-4", "rule"][..],
        &["-6", "rule"],
        &["-4", "route", "show", "table", "all"],
        &["-6", "route", "show", "table", "all"],
    ]
    .iter()
    .map(|args| {
        let mut a = vec!["-j"];
        a.extend_from_slice(args);
        ns.ip(&a)
    })
    .collect::<Vec<_>>()
    .join("\n")
}

/// ICMP packets seen arriving on `dev` in `ns` (an nftables counter).
fn icmp_counter(ns: &Netns, dev: &str) -> u64 {
    let out = ns
        .cmd("nft")
        .args(["list", "chain", "inet", "watch", "in"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let _ = dev;
    text.split("packets ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .expect("the nftables counter")
}

/// Fields drop in order: the server ends (and cleans up) before its
/// namespaces go.
struct Vpn {
    server_proc: Proc,
    i: Netns,
    bed: Bed,
    client: PathBuf,
    name: String,
}

/// The three namespaces, the server running, the client's file written
/// with `extra` in its [Interface].
fn vpn(tag: &str, extra: &str) -> Vpn {
    let bed = bed(tag);
    let i = bed.lab.netns("i");
    bed.lab.veth(&bed.b, "vbi", &i, "vi");
    bed.b.ip(&["addr", "add", "10.212.0.1/24", "dev", "vbi"]);
    i.ip(&["addr", "add", "10.212.0.2/24", "dev", "vi"]);
    // The client reaches the server over the underlay by its default route,
    // as a laptop does; the "internet" has no way back to the underlay.
    bed.a.ip(&["route", "add", "default", "via", "10.200.0.2"]);
    bed.b
        .cmd("sysctl")
        .args(["-qw", "net.ipv4.ip_forward=1"])
        .status()
        .unwrap();
    nft(
        &bed.b,
        "table ip nat {\n chain post {\n  type nat hook postrouting priority 100; ip saddr 10.79.0.0/24 oifname \"vbi\" masquerade\n }\n}\n\
         table inet watch {\n chain in {\n  type filter hook prerouting priority 0; iifname \"vb\" meta l4proto { icmp, ipv6-icmp } counter\n }\n}\n",
    );
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let name = ifname(&format!("v{tag}"));
    let server = write_private(
        &bed.dir,
        &format!("server/{}.conf", ifname("srv")),
        &format!(
            "[Interface]\nPrivateKey = {kb}\nListenPort = 51890\nAddress = 10.79.0.1/24\n\n\
             [Peer]\nPublicKey = {pa}\nAllowedIPs = 10.79.0.2/32\n"
        ),
    );
    let server_proc = run_tapir(&bed.b, &server, &ifname("srv"));
    let client = write_private(
        &bed.dir,
        &format!("{name}.conf"),
        &format!(
            "[Interface]\nPrivateKey = {ka}\nAddress = 10.79.0.2/24, fd79::2/64\n{extra}\n\n\
             [Peer]\nPublicKey = {pb}\nEndpoint = 10.200.0.2:51890\nAllowedIPs = 0.0.0.0/0, ::/0\n"
        ),
    );
    Vpn {
        bed,
        i,
        client,
        server_proc,
        name,
    }
}

/// Kills the tunnel `name` started with `up` (SIGKILL: nothing taken
/// back), and waits for its device to go with it.
fn kill_tunnel(a: &Netns, dir: &std::path::Path, name: &str) {
    let json: serde_json::Value =
        serde_json::from_str(&ok(&tapir_in(a, dir, &["status", name, "--json"]))).unwrap();
    let pid = json[0]["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for(|| !a.has_link(name), "the device to go with its process");
}

/// The name resolvconf knows a tunnel's DNS by, as wg-quick makes it:
/// `tun.NAME` where Debian's resolvconf orders interfaces, `NAME` elsewhere.
fn resolvconf_iface(name: &str) -> String {
    let order = std::fs::read_to_string("/etc/resolvconf/interface-order").unwrap_or_default();
    match order.lines().find_map(|l| l.trim().strip_suffix('*')) {
        Some(p) if !p.is_empty() => format!("{p}.{name}"),
        _ => name.to_string(),
    }
}

#[test]
fn everything_through_the_tunnel_and_the_routing_exactly_as_before_after_down_or_a_crash() {
    require_root!();
    let v = vpn("dr", "");
    let (a, dir) = (&v.bed.a, &v.bed.dir);
    let before = routing(a);
    // Without the tunnel the "internet" does not answer (no way back).
    let out = a
        .cmd("ping")
        .args(["-c", "1", "-W", "1", "10.212.0.2"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the underlay alone reaches 10.212.0.2"
    );
    for crash in [false, true] {
        ok(&tapir_in(a, dir, &["up", v.client.to_str().unwrap()]));
        let rules = a.ip(&["rule"]) + &a.ip(&["-6", "rule"]);
        assert!(
            rules.contains("not from all fwmark 0xca6c lookup 51820")
                && rules.contains("from all lookup main suppress_prefixlength 0"),
            "{rules}"
        );
        // wg-quick's firewall, in tables of the tunnel's own.
        let tables = || sh(a.cmd("nft").args(["list", "tables"]));
        let t = tables();
        assert!(
            t.contains(&format!("table ip tapir-{}", v.name))
                && t.contains(&format!("table ip6 tapir-{}", v.name)),
            "{t}"
        );
        let fw = sh(a
            .cmd("nft")
            .args(["list", "table", "ip", &format!("tapir-{}", v.name)]));
        assert!(
            fw.contains(&format!(
                "iifname != \"{}\" ip daddr 10.79.0.2 fib saddr type != local drop",
                v.name
            )) && fw.contains("meta l4proto udp meta mark set ct mark"),
            "{fw}"
        );
        let icmp_before = icmp_counter(&v.bed.b, "vb");
        ping(a, "10.212.0.2");
        assert_eq!(
            icmp_counter(&v.bed.b, "vb"),
            icmp_before,
            "ICMP crossed the underlay outside the tunnel"
        );
        // The counter counts: the server's underlay address is more
        // specific than the default route, so it stays on the underlay.
        ping(a, "10.200.0.2");
        assert!(
            icmp_counter(&v.bed.b, "vb") > icmp_before,
            "the underlay's own traffic is seen"
        );
        // The tunnel's own packets still leave through the underlay: the
        // handshake happened, and goes on happening.
        let st = ok(&tapir_in(a, dir, &["status", &v.name]));
        assert!(
            st.contains("latest handshake") && !st.contains("latest handshake: never"),
            "{st}"
        );
        if crash {
            kill_tunnel(a, dir, &v.name);
            assert_ne!(
                routing(a),
                before,
                "a killed tunnel cannot take its rules back"
            );
            // An up takes them back first, and says so where it was asked.
            let again = tapir_in(a, dir, &["up", v.client.to_str().unwrap()]);
            let err = String::from_utf8_lossy(&again.stderr);
            assert!(
                again.status.success()
                    && err.contains("for an earlier run that did not stop cleanly"),
                "{err}"
            );
            kill_tunnel(a, dir, &v.name);
        }
        let out = ok(&tapir_in(a, dir, &["down", &v.name]));
        assert!(out.contains("is down"), "{out}");
        assert_eq!(
            routing(a),
            before,
            "rules and routes after down{}",
            if crash { " (after a crash)" } else { "" }
        );
        let t = sh(a.cmd("nft").args(["list", "tables"]));
        assert!(!t.contains("tapir-"), "firewall tables after down: {t}");
    }
    drop(v.server_proc);
    let _ = &v.i;
}

#[test]
fn hooks_run_in_order_and_a_failing_post_up_takes_everything_back() {
    require_root!();
    let log = std::env::temp_dir().join(format!("tapir-vpn-hooks-{}", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let l = log.display();
    let hooks = format!(
        "PreUp = echo preup %i >> {l}\nPostUp = echo postup %i >> {l}\nPostUp = ip -o link show %i >/dev/null && echo device-there >> {l}\n\
         PreDown = echo predown %i >> {l}\nPostDown = echo postdown %i >> {l}"
    );
    let v = vpn("hk", &hooks);
    let (a, dir) = (&v.bed.a, &v.bed.dir);
    let before = routing(a);
    ok(&tapir_in(a, dir, &["up", v.client.to_str().unwrap()]));
    ok(&tapir_in(a, dir, &["down", &v.name]));
    let n = &v.name;
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        format!("preup {n}\npostup {n}\ndevice-there\npredown {n}\npostdown {n}\n")
    );
    // A tunnel killed outright: down runs its down hooks for it (PostDown
    // is where a firewall rule of PostUp goes away).
    std::fs::remove_file(&log).unwrap();
    ok(&tapir_in(a, dir, &["up", v.client.to_str().unwrap()]));
    kill_tunnel(a, dir, n);
    let out = ok(&tapir_in(a, dir, &["down", n]));
    assert!(out.contains("is down"), "{out}");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        format!("preup {n}\npostup {n}\ndevice-there\npredown {n}\npostdown {n}\n")
    );
    assert_eq!(routing(a), before, "the rules went with the down");
    // A PostUp that fails: up fails with it, and nothing is left.
    std::fs::remove_file(&log).unwrap();
    let text = std::fs::read_to_string(&v.client).unwrap().replace(
        "PostUp = echo postup",
        "PostUp = false\nPostUp = echo postup",
    );
    std::fs::write(&v.client, text).unwrap();
    let out = tapir_in(a, dir, &["up", v.client.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("{n}: PostUp = false")), "{err}");
    assert!(!a.has_link(n), "the device went with the failed up");
    assert_eq!(routing(a), before, "the rules went with the failed up");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        format!("preup {n}\n"),
        "no later hook, and no down hooks for a tunnel that never came up"
    );
    std::fs::remove_file(&log).unwrap();
}

#[test]
fn dns_goes_through_resolvconf_and_saveconfig_keeps_peers_added_with_wg_set() {
    require_root!();
    let v = vpn("dn", "DNS = 10.79.0.1, corp.example\nSaveConfig = true");
    let (a, dir) = (&v.bed.a, &v.bed.dir);
    // A resolvconf that writes down how it was called.
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let calls = dir.join("resolvconf.calls");
    std::fs::write(
        bin.join("resolvconf"),
        format!(
            "#!/bin/sh\necho \"$@\" >> {0}\nif [ \"$1\" = -a ]; then cat >> {0}; fi\n",
            calls.display()
        ),
    )
    .unwrap();
    Command::new("chmod")
        .args(["755", bin.join("resolvconf").to_str().unwrap()])
        .status()
        .unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let run_with = |path: &str, args: &[&str]| {
        a.cmd(env!("CARGO_BIN_EXE_tapir"))
            .args(args)
            .env("TAPIR_RUN_DIR", dir.join("run"))
            .env("TAPIR_LOG_DIR", dir.join("log"))
            .env("PATH", path)
            .output()
            .unwrap()
    };
    let run = |args: &[&str]| run_with(&path, args);
    // Without resolvconf, or with one that fails, the tunnel does not start
    // and nothing is left, as with wg-quick (it came up with a warning, the
    // host's queries going to its old name servers, past the tunnel).
    let name = v.client.file_stem().unwrap().to_str().unwrap();
    let failing = dir.join("failing");
    std::fs::create_dir_all(&failing).unwrap();
    // (Writing down its calls: the failed -a is taken back with -d.)
    let failed_calls = dir.join("failing.calls");
    std::fs::write(
        failing.join("resolvconf"),
        format!(
            "#!/bin/sh\necho \"$@\" >> {}\n[ \"$1\" = -a ] && exit 3\nexit 0\n",
            failed_calls.display()
        ),
    )
    .unwrap();
    Command::new("chmod")
        .args(["755", failing.join("resolvconf").to_str().unwrap()])
        .status()
        .unwrap();
    // Everything of the PATH but resolvconf (`ip` runs tapir in the
    // namespace, `nft` keeps the default route's packets).
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    for d in std::env::var("PATH").unwrap().split(':') {
        for entry in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let name = entry.file_name();
            if name == "resolvconf" {
                continue;
            }
            for to in [&empty, &failing] {
                if !to.join(&name).exists() {
                    let _ = std::os::unix::fs::symlink(entry.path(), to.join(&name));
                }
            }
        }
    }
    for (p, want) in [
        (&empty, "resolvconf is not installed"),
        (&failing, "DNS: resolvconf -a"),
    ] {
        let out = run_with(p.to_str().unwrap(), &["up", v.client.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{err}");
        assert!(!a.has_link(name), "{want}: the device was left");
    }
    let iface = resolvconf_iface(name);
    assert_eq!(
        std::fs::read_to_string(&failed_calls).unwrap(),
        format!("-a {iface} -m 0 -x\n-d {iface} -f\n"),
        "the failed -a is taken back"
    );
    ok(&run(&["up", v.client.to_str().unwrap()]));
    let n = &v.name;
    let iface = resolvconf_iface(n);
    assert_eq!(
        std::fs::read_to_string(&calls).unwrap(),
        format!("-a {iface} -m 0 -x\nnameserver 10.79.0.1\nsearch corp.example\n")
    );
    // Killed outright: down takes its DNS back for it.
    kill_tunnel(a, dir, n);
    ok(&run(&["down", n]));
    assert!(
        std::fs::read_to_string(&calls)
            .unwrap()
            .ends_with(&format!("-d {iface} -f\n")),
        "DNS taken back on down after a crash"
    );
    std::fs::remove_file(&calls).unwrap();
    ok(&run(&["up", v.client.to_str().unwrap()]));
    // A peer added at run time, as wg-quick users do, kept by SaveConfig.
    let (_, added) = genkey();
    let out = a
        .cmd("wg")
        .args(["set", n, "peer", &added, "allowed-ips", "10.79.0.9/32"])
        .output()
        .unwrap();
    ok(&out);
    ok(&run(&["down", n]));
    assert!(
        std::fs::read_to_string(&calls)
            .unwrap()
            .ends_with(&format!("-d {iface} -f\n")),
        "DNS taken back on down"
    );
    let saved = std::fs::read_to_string(&v.client).unwrap();
    assert!(
        saved.contains("DNS = 10.79.0.1, corp.example\nSaveConfig = true")
            && saved.contains(&format!("PublicKey = {added}\nAllowedIPs = 10.79.0.9/32"))
            && saved.contains("Endpoint = 10.200.0.2:51890"),
        "{saved}"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&v.client).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The saved file comes up again.
    ok(&run(&["up", v.client.to_str().unwrap()]));
    ok(&run(&["down", n]));
}

/// SaveConfig into a file another user owns, 0600 (as an admin's file
/// may be): written at down, its owner and mode kept (the tunnel, which
/// gives up root's other capabilities, failed to open it and said so only
/// in its log).
#[test]
fn saveconfig_writes_a_file_another_user_owns() {
    require_root!();
    let v = vpn("sv", "SaveConfig = true");
    let (a, dir) = (&v.bed.a, &v.bed.dir);
    std::os::unix::fs::chown(&v.client, Some(65534), Some(65534)).unwrap();
    ok(&tapir_in(a, dir, &["up", v.client.to_str().unwrap()]));
    let n = &v.name;
    let (_, added) = genkey();
    let out = a
        .cmd("wg")
        .args(["set", n, "peer", &added, "allowed-ips", "10.79.0.9/32"])
        .output()
        .unwrap();
    ok(&out);
    ok(&tapir_in(a, dir, &["down", n]));
    let saved = std::fs::read_to_string(&v.client).unwrap();
    assert!(
        saved.contains(&format!("PublicKey = {added}\nAllowedIPs = 10.79.0.9/32")),
        "{saved}"
    );
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(&v.client).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (65534, 0o600));
}

/// A route another device holds: up fails naming it, as wg-quick's does,
/// and leaves nothing (the tunnel's traffic would have passed it by); an
/// address's own prefix route covers an allowed IP as before. With
/// `Table = N`, a reload's routes follow the allowed IPs in table N,
/// default routes too.
#[test]
fn routes_held_elsewhere_are_refused_and_a_reload_follows_in_its_table() {
    require_root!();
    let bed = bed("rt");
    let (a, dir) = (&bed.a, &bed.dir);
    let ((ka, _), (_, pb)) = (genkey(), genkey());
    let n = ifname("rtx");
    a.ip(&["route", "add", "10.123.0.0/16", "dev", "lo"]);
    let conf = |extra: &str, ips: &str| {
        write_private(
            dir,
            &format!("{n}.conf"),
            &format!(
                "[Interface]\nPrivateKey = {ka}\nAddress = 10.124.0.2/24\n{extra}\n[Peer]\nPublicKey = {pb}\nEndpoint = 10.200.0.2:51820\nAllowedIPs = {ips}\n"
            ),
        )
    };
    let file = conf("", "10.124.0.0/24, 10.123.0.0/16");
    let out = tapir_in(a, dir, &["up", file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("lo already has the route to 10.123.0.0/16"),
        "{err}"
    );
    assert!(!a.has_link(&n), "nothing left");
    // Table = 1234: every route there, and a reload follows.
    let file = conf("Table = 1234", "10.70.0.0/16, 10.71.0.0/16");
    ok(&tapir_in(a, dir, &["up", file.to_str().unwrap()]));
    // (A table without routes of a family is "not there" to ip: no error.)
    let table = || {
        ["-4", "-6"]
            .iter()
            .map(|f| {
                let out = a
                    .cmd("ip")
                    .args([f, "route", "show", "table", "1234"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).into_owned()
            })
            .collect::<String>()
    };
    let t = table();
    assert!(
        t.contains("10.70.0.0/16 dev") && t.contains("10.71.0.0/16 dev"),
        "{t}"
    );
    conf("Table = 1234", "10.70.0.0/16, ::/0");
    ok(&tapir_in(a, dir, &["reload", &n]));
    let t = table();
    assert!(
        t.contains("10.70.0.0/16 dev") && !t.contains("10.71.0.0/16") && t.contains("default dev"),
        "{t}"
    );
    ok(&tapir_in(a, dir, &["down", &n]));
    assert!(table().trim().is_empty(), "{}", table());
}

/// A reload makes the key and port the file's, as `wg syncconf` does:
/// what `wg set` changed goes back, a new ListenPort moves the socket, a
/// port another socket holds is named and the tunnel keeps its own.
#[test]
fn a_reload_makes_the_key_and_port_the_files() {
    require_root!();
    let bed = bed("rk");
    let ((ka, pa), (kb, pb), (k2, p2)) = (genkey(), genkey(), genkey());
    let n = ifname("rkb");
    let dir = &bed.dir;
    let hub = |port: u16| {
        format!(
            "[Interface]\nPrivateKey = {kb}\nListenPort = {port}\nAddress = 10.77.0.2/24\n\n[Peer]\nPublicKey = {pa}\nAllowedIPs = 10.77.0.1/32\n"
        )
    };
    let file = write_private(dir, &format!("{n}.conf"), &hub(51896));
    ok(&tapir_in(&bed.b, dir, &["up", file.to_str().unwrap()]));
    let na = ifname("rka");
    let spoke = write_private(
        dir,
        &format!("{na}.conf"),
        &format!(
            "[Interface]\nPrivateKey = {ka}\nAddress = 10.77.0.1/24\n\n[Peer]\nPublicKey = {pb}\nEndpoint = 10.200.0.2:51896\nAllowedIPs = 10.77.0.0/24\n"
        ),
    );
    let _ta = run_tapir(&bed.a, &spoke, &na);
    ping(&bed.a, "10.77.0.2");
    let show = |what: &str| {
        sh(bed.b.cmd("wg").args(["show", &n, what]))
            .trim()
            .to_owned()
    };
    let key2 = write_private(dir, "k2", &k2);
    let out = bed
        .b
        .cmd("wg")
        .args(["set", &n, "listen-port", "40111", "private-key"])
        .arg(&key2)
        .output()
        .unwrap();
    ok(&out);
    assert_eq!(
        (show("listen-port"), show("public-key")),
        ("40111".into(), p2)
    );
    // The file unchanged: the key and port go back to it, and the peer,
    // which knows only that key, is reached again (b pings: a learns the port).
    let text = ok(&tapir_in(&bed.b, dir, &["reload", &n]));
    assert!(
        text.contains("now listens on port 51896")
            && text.contains("has the file's private key now"),
        "{text}"
    );
    assert_eq!(
        (show("listen-port"), show("public-key")),
        ("51896".into(), pb.clone())
    );
    ping(&bed.b, "10.77.0.1");
    // A new ListenPort in the file moves the socket.
    std::fs::write(&file, hub(51897)).unwrap();
    let text = ok(&tapir_in(&bed.b, dir, &["reload", &n]));
    assert!(
        text.contains("now listens on port 51897") && !text.contains("key"),
        "{text}"
    );
    assert_eq!(show("listen-port"), "51897");
    ping(&bed.b, "10.77.0.1");
    ping(&bed.a, "10.77.0.2");
    // One held by another socket: named, the tunnel keeps its port and the
    // rest of the reload happens; `reload` exits 1 (it said 0).
    let ns_path = bed.b.path();
    let holder = std::thread::spawn(move || {
        tapir_sys::netns::enter(&ns_path).unwrap();
        std::net::UdpSocket::bind("[::]:51898").unwrap()
    })
    .join()
    .unwrap();
    std::fs::write(
        &file,
        hub(51898).replace("10.77.0.1/32", "10.77.0.1/32, 10.77.6.0/24"),
    )
    .unwrap();
    let out = tapir_in(&bed.b, dir, &["reload", &n]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("error: ListenPort = 51898 not applied: Address already in use"),
        "{err}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("reloaded in part") && text.contains("1 changed"),
        "{text}"
    );
    assert_eq!(show("listen-port"), "51897");
    drop(holder);
    ok(&tapir_in(&bed.b, dir, &["down", &n]));
}

#[test]
fn reload_adds_removes_and_changes_peers_without_dropping_the_others() {
    require_root!();
    let bed = bed("rl");
    let c = bed.lab.netns("c");
    bed.lab.veth(&c, "vc", &bed.b, "vbc");
    c.ip(&["addr", "add", "10.202.0.1/24", "dev", "vc"]);
    bed.b.ip(&["addr", "add", "10.202.0.2/24", "dev", "vbc"]);
    let ((ka, pa), (kb, pb), (kc, pc)) = (genkey(), genkey(), genkey());
    let (_, pnew) = genkey();
    let hub = |peers: &str| {
        format!(
            "[Interface]\nPrivateKey = {kb}\nListenPort = 51895\nAddress = 10.77.0.2/24\n{peers}"
        )
    };
    let peer_a = format!("\n[Peer]\nPublicKey = {pa}\nAllowedIPs = 10.77.0.1/32\n");
    let peer_c = |ips: &str| format!("\n[Peer]\nPublicKey = {pc}\nAllowedIPs = {ips}\n");
    let n = ifname("rlb");
    let file = write_private(
        &bed.dir,
        &format!("{n}.conf"),
        &hub(&(peer_a.clone() + &peer_c("10.77.0.3/32"))),
    );
    let dir = &bed.dir;
    ok(&tapir_in(&bed.b, dir, &["up", file.to_str().unwrap()]));
    let spoke = |ns: &Netns, key: &str, addr: &str, via: &str, name: &str| {
        let f = write_private(
            dir,
            &format!("{name}.conf"),
            &format!(
                "[Interface]\nPrivateKey = {key}\nAddress = {addr}/24\n\n[Peer]\nPublicKey = {pb}\nEndpoint = {via}:51895\nAllowedIPs = 10.77.0.0/24, 10.77.5.0/24\n"
            ),
        );
        run_tapir(ns, &f, name)
    };
    let _ta = spoke(&bed.a, &ka, "10.77.0.1", "10.200.0.2", &ifname("rla"));
    let _tc = spoke(&c, &kc, "10.77.0.3", "10.202.0.2", &ifname("rlc"));
    ping(&bed.a, "10.77.0.2");
    ping(&c, "10.77.0.2");
    let handshake_a = |ns: &Netns| -> String {
        let out = ns
            .cmd("wg")
            .args(["show", &n, "latest-handshakes"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with(&pa))
            .unwrap_or("")
            .to_owned()
    };
    let before = handshake_a(&bed.b);
    // A ping from a runs through every reload below and must lose nothing.
    let pinger = bed
        .a
        .cmd("ping")
        .args(["-q", "-i", "0.05", "-c", "120", "-W", "1", "10.77.0.2"])
        .output();
    let reloads = std::thread::scope(|s| {
        let h = s.spawn(|| pinger.unwrap());
        std::thread::sleep(Duration::from_millis(500));
        // c gains a subnet, a new peer appears.
        std::fs::write(
            &file,
            hub(&(peer_a.clone()
                + &peer_c("10.77.0.3/32, 10.77.5.0/24")
                + &format!("\n[Peer]\nPublicKey = {pnew}\nAllowedIPs = 10.77.0.9/32\n"))),
        )
        .unwrap();
        let first = ok(&tapir_in(&bed.b, dir, &["reload", &n]));
        // A broken file is refused whole.
        std::fs::write(
            &file,
            hub(&(peer_a.clone() + "\n[Peer]\nPublicKey = broken\n")),
        )
        .unwrap();
        let broken = tapir_in(&bed.b, dir, &["reload", &n]);
        // c goes, by SIGHUP this time.
        std::fs::write(&file, hub(&peer_a)).unwrap();
        let st: serde_json::Value =
            serde_json::from_str(&ok(&tapir_in(&bed.b, dir, &["status", &n, "--json"]))).unwrap();
        let pid = st[0]["pid"].as_i64().unwrap() as i32;
        let peers_now = || {
            let out = bed
                .b
                .cmd("wg")
                .args(["show", &n, "peers"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).lines().count()
        };
        let during = (peers_now(), bed.b.ip(&["route", "show", "10.77.5.0/24"]));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while peers_now() != 1 {
            assert!(Instant::now() < deadline, "SIGHUP did not reload");
            std::thread::sleep(Duration::from_millis(50));
        }
        (first, broken, during, h.join().unwrap())
    });
    let (first, broken, (peers_during, route_during), ping_out) = reloads;
    assert!(
        first.contains("1 peer(s) added, 0 removed, 1 changed"),
        "{first}"
    );
    assert!(!broken.status.success());
    let err = String::from_utf8_lossy(&broken.stderr);
    assert!(
        err.contains("refused") && err.contains(&format!("{n}.conf")),
        "{err}"
    );
    assert_eq!(peers_during, 3, "the broken file changed nothing");
    assert!(
        route_during.contains("10.77.5.0/24"),
        "a reload routes new allowed IPs: {route_during}"
    );
    let text = String::from_utf8_lossy(&ping_out.stdout);
    assert!(
        ping_out.status.success() && text.contains(" 0% packet loss"),
        "the unchanged peer's ping stopped: {text}"
    );
    assert_eq!(
        handshake_a(&bed.b),
        before,
        "the unchanged peer kept its session"
    );
    assert!(
        bed.b
            .ip(&["route", "show", "10.77.5.0/24"])
            .trim()
            .is_empty(),
        "c's subnet route went with c"
    );
    // A new peer's route another device holds: the reload says so and
    // exits 1; once that device lets go, the same file made again makes it
    // (the route was counted as made, and the next reload did nothing).
    bed.b.ip(&["route", "add", "10.77.8.0/24", "dev", "vbc"]);
    let (_, pz) = genkey();
    std::fs::write(
        &file,
        hub(&(peer_a.clone() + &format!("\n[Peer]\nPublicKey = {pz}\nAllowedIPs = 10.77.8.0/24\n"))),
    )
    .unwrap();
    let out = tapir_in(&bed.b, dir, &["reload", &n]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && err.contains("routes:") && err.contains("10.77.8.0/24"),
        "{err}"
    );
    bed.b.ip(&["route", "del", "10.77.8.0/24", "dev", "vbc"]);
    ok(&tapir_in(&bed.b, dir, &["reload", &n]));
    assert!(
        bed.b
            .ip(&["route", "show", "10.77.8.0/24"])
            .contains(&format!("dev {n}")),
        "the second reload made the route"
    );
    ok(&tapir_in(&bed.b, dir, &["down", &n]));
}

#[test]
fn systemd_hears_ready_only_once_the_tunnel_answers_and_reloading_and_stopping() {
    require_root!();
    use std::os::unix::net::UnixDatagram;
    let bed = bed("sd");
    let (k, _) = genkey();
    let n = ifname("sdn");
    let file = write_private(
        &bed.dir,
        &format!("{n}.conf"),
        &format!("[Interface]\nPrivateKey = {k}\nListenPort = 51896\nAddress = 10.77.0.1/24\n"),
    );
    let sock_path = bed.dir.join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut child = bed
        .a
        .cmd(env!("CARGO_BIN_EXE_tapir"))
        .args(["run", file.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let mut next = || {
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next(), "READY=1");
    // At READY the device is there and the control socket answers.
    assert!(bed.a.has_link(&n));
    let out = bed.a.cmd("wg").args(["show", &n]).output().unwrap();
    ok(&out);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let r = next();
    assert!(r.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{r}");
    assert_eq!(next(), "READY=1");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(next(), "STOPPING=1");
    assert!(child.wait().unwrap().success());
}

#[test]
fn stock_wg_quick_runs_tapir_as_its_userspace_wireguard() {
    require_root!();
    let bed = bed("wq");
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let b = Side {
        ns: &bed.b,
        name: ifname("wqb"),
        port: 51897,
        addr: "10.77.0.2",
    };
    let _gb = wireguard_go(&bed, &b, &kb, &pa, None, "10.77.0.1/32");
    // wg-quick takes one executable: tapir through a link of that name.
    let link = bed.dir.join("tapir-wireguard-go");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_tapir"), &link).unwrap();
    let name = ifname("wqa");
    let conf = write_private(
        &bed.dir,
        &format!("{name}.conf"),
        &format!(
            "[Interface]\nPrivateKey = {ka}\nAddress = 10.77.0.1/24\n\n\
             [Peer]\nPublicKey = {pb}\nEndpoint = 10.200.0.2:51897\nAllowedIPs = 0.0.0.0/0\nPersistentKeepalive = 25\n"
        ),
    );
    // A path of 1300 bytes: wg-quick sets the tunnel's MTU 80 below it,
    // from `wg show NAME endpoints`, asked right after its `wg setconf`
    // (a request answered EIO there left the MTU at 1420).
    bed.a.ip(&["link", "set", "va", "mtu", "1300"]);
    bed.b.ip(&["link", "set", "vb", "mtu", "1300"]);
    let before = routing(&bed.a);
    let wg_quick = |verb: &str| {
        bed.a
            .cmd("wg-quick")
            .args([verb, conf.to_str().unwrap()])
            .env("WG_QUICK_USERSPACE_IMPLEMENTATION", &link)
            .env("TAPIR_LOG_DIR", bed.dir.join("log"))
            .output()
            .expect("wg-quick (Debian package wireguard-tools)")
    };
    let up = wg_quick("up");
    let log = || {
        Command::new("sh")
            .args([
                "-c",
                &format!(
                    "cat {}/log/*/*.log {}/log/*.log 2>/dev/null",
                    bed.dir.display(),
                    bed.dir.display()
                ),
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    assert!(
        up.status.success(),
        "wg-quick up: {}\nlog: {}",
        String::from_utf8_lossy(&up.stderr),
        log()
    );
    let mtu = sh(bed.a.cmd("cat").arg(format!("/sys/class/net/{name}/mtu")));
    assert_eq!(mtu.trim(), "1220", "the tunnel's MTU");
    // Everything through tapir, to wireguard-go.
    ping(&bed.a, "10.77.0.2");
    // The daemon wg-quick started parses datagrams with CAP_NET_ADMIN and
    // CAP_NET_BIND_SERVICE alone.
    let pid = engine_pid(&name).unwrap_or_else(|| panic!("no tapir wireguard-go {name} running"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
        let v = status
            .lines()
            .find_map(|l| l.strip_prefix(set))
            .unwrap()
            .trim();
        assert_eq!(v, "0000000000001400", "{set} of {pid}: {status}");
    }
    let show = bed.a.cmd("wg").args(["show", &name]).output().unwrap();
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.contains(&pb) && text.contains("latest handshake") && text.contains("fwmark: 0xca6c"),
        "{text}"
    );
    let down = wg_quick("down");
    assert!(
        down.status.success(),
        "wg-quick down: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    let sock = PathBuf::from(format!("/var/run/wireguard/{name}.sock"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while sock.exists() || a_netns_sock(&name) {
        assert!(
            Instant::now() < deadline,
            "the daemon outlived its device: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!bed.a.has_link(&name));
    assert_eq!(
        routing(&bed.a),
        before,
        "wg-quick down left routing as before"
    );
}

/// The pid of `tapir wireguard-go ... NAME` (names are unique per test).
fn engine_pid(name: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        (args.contains(&b"wireguard-go".as_slice()) && args.contains(&name.as_bytes()))
            .then_some(pid)
    })
}

/// Whether a control socket of that name is left in any namespace's directory.
fn a_netns_sock(name: &str) -> bool {
    std::fs::read_dir("/var/run/wireguard")
        .map(|d| {
            d.flatten()
                .any(|e| e.path().join(format!("{name}.sock")).exists())
        })
        .unwrap_or(false)
}
