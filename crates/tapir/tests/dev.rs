//! `tapir dev` against the real kernel, in throw-away network namespaces,
//! compared with what iproute2 does and sees.

use std::process::Output;

use netlab::{Lab, Netns, require_root};
use serde_json::Value;

const TAPIR: &str = env!("CARGO_BIN_EXE_tapir");
const NOBODY: &str = "65534";

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run_output(out: Output) -> Run {
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn tapir(ns: &Netns, args: &[&str]) -> Run {
    run_output(ns.cmd(TAPIR).args(args).output().expect("run tapir"))
}

/// Runs tapir as user and group 65534 (nobody) with no capabilities.
fn tapir_as_nobody(ns: &Netns, args: &[&str]) -> Run {
    let out = ns
        .cmd("setpriv")
        .args([
            "--reuid",
            NOBODY,
            "--regid",
            NOBODY,
            "--clear-groups",
            TAPIR,
        ])
        .args(args)
        .output()
        .expect("run setpriv");
    run_output(out)
}

fn ok(ns: &Netns, args: &[&str]) -> String {
    let r = tapir(ns, args);
    assert!(r.ok, "tapir {args:?} failed: {}", r.stderr);
    r.stdout
}

fn fails(ns: &Netns, args: &[&str]) -> String {
    let r = tapir(ns, args);
    assert!(
        !r.ok,
        "tapir {args:?} should have failed; stdout: {}",
        r.stdout
    );
    assert!(
        r.stderr.starts_with("tapir: "),
        "errors go to stderr: {}",
        r.stderr
    );
    r.stderr
}

/// The tun driver's view of a device as iproute2 reports it, without the
/// queue counters (which depend on who has it open).
fn info_data(ns: &Netns, dev: &str) -> Value {
    let mut v = ns.ip_json(&["link", "show", "dev", dev])[0]["linkinfo"]["info_data"].clone();
    let obj = v.as_object_mut().expect("tun info_data");
    obj.remove("numqueues");
    obj.remove("numdisabled");
    v
}

/// Everything about a namespace that a failed command must leave as it was.
fn snapshot(ns: &Netns) -> Vec<Value> {
    let mut links = ns.ip_json(&["link", "show"]);
    let mut addrs = ns.ip_json(&["addr", "show"]);
    for l in links
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .chain(addrs.as_array_mut().unwrap())
    {
        let o = l.as_object_mut().unwrap();
        // Counters move on their own; bringing a link up for the first time
        // attaches a default qdisc that stays after it goes down again (not
        // ours to take back). Compare the configuration only.
        for k in ["stats64", "stats", "qdisc"] {
            o.remove(k);
        }
    }
    vec![
        links,
        addrs,
        ns.ip_json(&["-4", "route", "show", "table", "all"]),
        ns.ip_json(&["-6", "route", "show", "table", "all"]),
    ]
}

#[test]
fn add_leaves_the_device_as_ip_tuntap_would() {
    require_root!();
    let lab = Lab::new();
    let ours = lab.netns("ours");
    let theirs = lab.netns("theirs");
    let cases: [(&[&str], &[&str]); 4] = [
        (&["--mode", "tun"], &["mode", "tun"]),
        (&["--mode", "tap"], &["mode", "tap"]),
        (
            &[
                "--mode",
                "tap",
                "--user",
                "nobody",
                "--group",
                "nogroup",
                "--multi-queue",
                "--vnet-hdr",
            ],
            &[
                "mode",
                "tap",
                "user",
                "nobody",
                "group",
                "nogroup",
                "multi_queue",
                "vnet_hdr",
            ],
        ),
        (
            &["--mode", "tun", "--user", "4242", "--pi"],
            &["mode", "tun", "user", "4242", "pi"],
        ),
    ];
    for (i, (tapir_args, ip_args)) in cases.iter().enumerate() {
        let name = format!("dev{i}");
        let mut args = vec!["dev", "add", &name];
        args.extend_from_slice(tapir_args);
        assert_eq!(ok(&ours, &args).trim(), name, "prints the device name");
        theirs.ip(&[&["tuntap", "add", "dev", &name][..], ip_args].concat());
        let (a, b) = (info_data(&ours, &name), info_data(&theirs, &name));
        assert_eq!(a, b, "tapir {tapir_args:?} vs ip tuntap {ip_args:?}");
        assert_eq!(a["persist"], true);
        // And our own view agrees with the kernel's.
        let show: Value =
            serde_json::from_str(&ok(&ours, &["dev", "show", &name, "--json"])).unwrap();
        assert_eq!(show["mode"], a["type"]);
        assert_eq!(show["pi"], a["pi"]);
        assert_eq!(show["vnet_hdr"], a["vnet_hdr"]);
        assert_eq!(show["multi_queue"], a["multi_queue"]);
        assert_eq!(show["persist"], true);
    }
}

#[test]
fn a_template_gets_the_kernels_choice() {
    require_root!();
    let lab = Lab::new();
    let ns = lab.netns("a");
    assert_eq!(ok(&ns, &["dev", "add", "--mode", "tap"]).trim(), "tap0");
    assert_eq!(ok(&ns, &["dev", "add", "--mode", "tap"]).trim(), "tap1");
    assert_eq!(
        ok(&ns, &["dev", "add", "vpn%d", "--mode", "tun"]).trim(),
        "vpn0"
    );
    assert!(ns.has_link("tap0") && ns.has_link("tap1") && ns.has_link("vpn0"));
}

#[test]
fn del_removes_tun_and_tap_and_nothing_else() {
    require_root!();
    let lab = Lab::new();
    let a = lab.netns("a");
    let b = lab.netns("b");
    lab.veth(&a, "eth0", &b, "eth0");
    ok(&a, &["dev", "add", "tun0", "--mode", "tun"]);
    ok(&a, &["dev", "add", "tap0", "--mode", "tap"]);
    ok(&a, &["dev", "del", "tun0"]);
    ok(&a, &["dev", "del", "tap0"]);
    assert!(!a.has_link("tun0") && !a.has_link("tap0"));

    let before = snapshot(&a);
    let e = fails(&a, &["dev", "del", "eth0"]);
    assert!(e.contains("eth0 is a veth device, not tun/tap"), "{e}");
    let e = fails(&a, &["dev", "del", "lo"]);
    assert!(e.contains("not tun/tap"), "{e}");
    let e = fails(&a, &["dev", "del", "tun0"]);
    assert!(e.contains("no device named tun0"), "{e}");
    assert_eq!(snapshot(&a), before);
    assert!(a.has_link("eth0"));
}

#[test]
fn set_does_what_ip_does() {
    require_root!();
    let lab = Lab::new();
    let ours = lab.netns("ours");
    let theirs = lab.netns("theirs");
    ok(&ours, &["dev", "add", "tun0", "--mode", "tun"]);
    theirs.ip(&["tuntap", "add", "dev", "tun0", "mode", "tun"]);
    ok(
        &ours,
        &[
            "dev",
            "set",
            "tun0",
            "--up",
            "--mtu",
            "1420",
            "--promisc",
            "on",
            "--addr",
            "10.7.0.1/24",
            "--addr",
            "10.7.9.1",
            "--peer",
            "10.7.9.2",
            "--addr",
            "fd07::1/64",
            "--route",
            "10.8.0.0/16",
            "--via",
            "10.7.0.254",
            "--route",
            "10.9.0.0/16",
            "--route",
            "fd08::/48",
        ],
    );
    for args in [
        &["link", "set", "tun0", "up", "mtu", "1420", "promisc", "on"][..],
        &["addr", "add", "10.7.0.1/24", "dev", "tun0"],
        &["addr", "add", "10.7.9.1", "peer", "10.7.9.2", "dev", "tun0"],
        &["addr", "add", "fd07::1/64", "dev", "tun0"],
        &[
            "route",
            "add",
            "10.8.0.0/16",
            "via",
            "10.7.0.254",
            "dev",
            "tun0",
        ],
        &["route", "add", "10.9.0.0/16", "dev", "tun0"],
        &["route", "add", "fd08::/48", "dev", "tun0"],
    ] {
        theirs.ip(args);
    }
    let compare = |what: &[&str]| {
        let strip = |mut v: Value| {
            for item in v.as_array_mut().unwrap() {
                let o = item.as_object_mut().unwrap();
                for k in [
                    "ifindex",
                    "address",
                    "stats64",
                    "stats",
                    "preferred_life_time",
                    "valid_life_time",
                ] {
                    o.remove(k);
                }
                if let Some(infos) = o.get_mut("addr_info").and_then(Value::as_array_mut) {
                    for i in infos {
                        i.as_object_mut().unwrap().remove("valid_life_time");
                        i.as_object_mut().unwrap().remove("preferred_life_time");
                    }
                }
            }
            v
        };
        assert_eq!(
            strip(ours.ip_json(what)),
            strip(theirs.ip_json(what)),
            "ip {what:?}"
        );
    };
    compare(&["link", "show", "dev", "tun0"]);
    compare(&["addr", "show", "dev", "tun0"]);
    compare(&["-4", "route", "show", "dev", "tun0"]);
    compare(&["-6", "route", "show", "dev", "tun0"]);
    let link = &ours.ip_json(&["link", "show", "dev", "tun0"])[0];
    assert_eq!(link["mtu"], 1420);
    let flags = link["flags"].to_string();
    assert!(
        flags.contains("\"UP\"") && flags.contains("PROMISC"),
        "{flags}"
    );

    // And back.
    ok(
        &ours,
        &[
            "dev",
            "set",
            "tun0",
            "--down",
            "--promisc",
            "off",
            "--del-route",
            "10.8.0.0/16",
            "--del-addr",
            "10.7.9.1/32",
            "--del-addr",
            "fd07::1/64",
            "--del-route",
            "fd08::/48",
        ],
    );
    for args in [
        &["route", "del", "10.8.0.0/16", "dev", "tun0"][..],
        &["addr", "del", "10.7.9.1", "peer", "10.7.9.2", "dev", "tun0"],
        &["addr", "del", "fd07::1/64", "dev", "tun0"],
        &["route", "del", "fd08::/48", "dev", "tun0"],
        &["link", "set", "tun0", "down", "promisc", "off"],
    ] {
        theirs.ip(args);
    }
    compare(&["link", "show", "dev", "tun0"]);
    compare(&["addr", "show", "dev", "tun0"]);
    compare(&["-4", "route", "show", "dev", "tun0"]);
    compare(&["-6", "route", "show", "dev", "tun0"]);
}

#[test]
fn a_failed_set_leaves_the_device_as_it_was() {
    require_root!();
    let lab = Lab::new();
    let ns = lab.netns("a");
    ok(&ns, &["dev", "add", "tun0", "--mode", "tun"]);
    // An IPv6 address on a down device: taking the link down again during
    // the rollback makes the kernel drop it; it must come back.
    ok(
        &ns,
        &[
            "dev",
            "set",
            "tun0",
            "--addr",
            "10.7.0.1/24",
            "--addr",
            "fd07::9/64",
        ],
    );
    let before = snapshot(&ns);
    assert!(before[1].to_string().contains("fd07::9"));

    // The kernel refuses the last step; the earlier ones are undone.
    let e = fails(
        &ns,
        &[
            "dev",
            "set",
            "tun0",
            "--up",
            "--mtu",
            "1300",
            "--promisc",
            "on",
            "--addr",
            "10.7.1.1/24",
            "--addr",
            "fd07::1/64",
            "--route",
            "10.9.0.0/16",
            "--via",
            "192.0.2.1",
        ],
    );
    assert!(
        e.contains("add route 10.9.0.0/16 via 192.0.2.1 failed"),
        "{e}"
    );
    assert!(e.contains("the device is as it was"), "{e}");
    assert_eq!(snapshot(&ns), before);

    // Refused before any kernel call: the second address is a duplicate,
    // an address to delete is not there, a peer has the wrong family.
    for (args, want) in [
        (
            &["--up", "--addr", "10.7.2.1/24", "--addr", "10.7.2.1/24"][..],
            "--addr 10.7.2.1 is given twice",
        ),
        (
            &["--mtu", "1400", "--del-addr", "10.99.0.1/24"],
            "has no address 10.99.0.1/24",
        ),
        (&["--mtu", "1000"], "below 1280, the IPv6 minimum"),
        (
            &["--addr", "10.7.3.1/24", "--peer", "fd00::2"],
            "same family",
        ),
        (&["--route", "10.9.1.1/16"], "did you mean 10.9.0.0/16"),
        (&["--addr", "10.7.0.300/24"], "not an address"),
        (&["--mtu", "20"], "out of range"),
    ] {
        let e = fails(&ns, &[&["dev", "set", "tun0"][..], args].concat());
        assert!(
            e.contains(want) && e.contains("nothing was changed"),
            "{args:?}: {e}"
        );
        assert_eq!(snapshot(&ns), before, "{args:?}");
    }
}

#[test]
fn add_of_an_existing_device() {
    require_root!();
    let lab = Lab::new();
    let a = lab.netns("a");
    let b = lab.netns("b");
    lab.veth(&a, "veth0", &b, "veth0");
    ok(
        &a,
        &["dev", "add", "tun0", "--mode", "tun", "--user", NOBODY],
    );
    let before = snapshot(&a);

    let e = fails(
        &a,
        &["dev", "add", "tun0", "--mode", "tun", "--user", NOBODY],
    );
    assert!(
        e.contains("tun0 already exists with the requested mode and flags"),
        "{e}"
    );
    assert!(e.contains("--exist-ok"), "{e}");
    let r = tapir(
        &a,
        &[
            "dev",
            "add",
            "tun0",
            "--mode",
            "tun",
            "--user",
            NOBODY,
            "--exist-ok",
        ],
    );
    assert!(r.ok && r.stdout.trim() == "tun0", "{}", r.stderr);

    let e = fails(
        &a,
        &["dev", "add", "tun0", "--mode", "tap", "--multi-queue"],
    );
    assert!(e.contains("other settings"), "{e}");
    assert!(e.contains("wanted mode tap, has tun"), "{e}");
    assert!(e.contains("wanted multi_queue, has not"), "{e}");
    assert!(e.contains("wanted user none, has 65534"), "{e}");
    let e = fails(&a, &["dev", "add", "tun0", "--mode", "tap", "--exist-ok"]);
    assert!(
        e.contains("other settings"),
        "--exist-ok does not cover a different device: {e}"
    );
    let e = fails(&a, &["dev", "add", "veth0", "--mode", "tun"]);
    assert!(
        e.contains("veth0 already exists and is a veth device, not tun/tap: choose another name")
            && !e.contains("dev del"),
        "{e}"
    );
    assert_eq!(snapshot(&a), before);
}

#[test]
fn bad_names_are_refused_with_the_rule() {
    require_root!();
    let lab = Lab::new();
    let ns = lab.netns("a");
    let before = snapshot(&ns);
    for (name, want) in [
        (
            "abcdefghijklmnop",
            "is 16 bytes long: the kernel allows at most 15",
        ),
        ("a/b", "may not contain '/'"),
        ("a b", "may not contain"),
        ("tab\tx", "may not contain"),
        ("", "interface name is empty"),
        ("..", "reserved"),
        ("t%s", "template"),
    ] {
        for cmd in [
            &["dev", "add", name, "--mode", "tun"][..],
            &["dev", "del", name],
            &["dev", "set", name, "--up"],
            &["dev", "show", name],
        ] {
            let e = fails(&ns, cmd);
            assert!(e.contains(want), "{cmd:?}: {e}");
        }
    }
    assert_eq!(snapshot(&ns), before);
}

#[test]
fn without_cap_net_admin_the_capability_is_named() {
    require_root!();
    let lab = Lab::new();
    let ns = lab.netns("a");
    ok(&ns, &["dev", "add", "tun0", "--mode", "tun"]);
    let before = snapshot(&ns);
    for cmd in [
        &["dev", "add", "tun1", "--mode", "tun"][..],
        &["dev", "del", "tun0"],
        &["dev", "set", "tun0", "--up", "--addr", "10.1.0.1/24"],
    ] {
        let r = tapir_as_nobody(&ns, cmd);
        assert!(!r.ok, "{cmd:?} must fail without privileges");
        assert!(
            r.stderr.contains("needs CAP_NET_ADMIN"),
            "{cmd:?}: {}",
            r.stderr
        );
        assert!(r.stderr.contains("sudo"), "{cmd:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("--user"),
            "suggests a device owned by the user: {}",
            r.stderr
        );
    }
    // Reading needs no privilege.
    let r = tapir_as_nobody(&ns, &["dev", "list"]);
    assert!(r.ok && r.stdout.contains("tun0"), "{}", r.stderr);
    assert_eq!(snapshot(&ns), before);
    // Its owner deletes a device as `ip tuntap del` and `tunctl -d` let it.
    for flags in [
        &["--mode", "tap"][..],
        &["--mode", "tun", "--multi-queue", "--vnet-hdr"],
    ] {
        let mut args = vec!["dev", "add", "own1", "--user", NOBODY];
        args.extend_from_slice(flags);
        ok(&ns, &args);
        let r = tapir_as_nobody(&ns, &["dev", "del", "own1"]);
        assert!(r.ok, "{flags:?}: {}", r.stderr);
        assert!(!ns.has_link("own1"), "{flags:?}");
    }
}

#[test]
fn a_missing_or_wrong_clone_device_is_explained() {
    require_root!();
    let lab = Lab::new();
    let ns = lab.netns("a");
    let dir = tempdir("clone");
    let missing = dir.join("tun");
    let plain = dir.join("plain");
    std::fs::write(&plain, b"").unwrap();
    let before = snapshot(&ns);
    let e = fails(
        &ns,
        &[
            "dev",
            "add",
            "tun0",
            "--mode",
            "tun",
            "--tun-path",
            missing.to_str().unwrap(),
        ],
    );
    assert!(
        e.contains("is missing") && e.contains("modprobe tun"),
        "{e}"
    );
    let e = fails(
        &ns,
        &[
            "dev",
            "add",
            "tun0",
            "--mode",
            "tun",
            "--tun-path",
            plain.to_str().unwrap(),
        ],
    );
    assert!(e.contains("is not a character device"), "{e}");
    let r = run_output(
        ns.cmd(TAPIR)
            .args(["doctor"])
            .env("TAPIR_TUN_PATH", &missing)
            .output()
            .unwrap(),
    );
    assert!(!r.ok, "doctor fails without a clone device");
    assert!(
        r.stdout.contains("FAIL") && r.stdout.contains("is missing"),
        "{}",
        r.stdout
    );
    assert_eq!(snapshot(&ns), before);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn doctor_passes_here() {
    require_root!();
    let lab = Lab::new();
    let ns = lab.netns("a");
    let r = tapir(&ns, &["doctor", "--json"]);
    let report: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["ok"], true, "{}", r.stdout);
    assert!(r.ok);
    let names: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for want in [
        "tun driver",
        "clone device",
        "CAP_NET_ADMIN",
        "multi-queue",
        "offloads",
        "netlink",
    ] {
        assert!(names.contains(&want), "{want} in {names:?}");
    }
    // The offload probe leaves no device behind.
    assert_eq!(ok(&ns, &["dev", "list", "--json"]).trim(), "[]");
}

/// Where capabilities are missing or do not count, doctor says which case
/// it is: a user namespace that owns nothing here (it said all was well),
/// root without CAP_NET_ADMIN (it said "run with sudo"), a user (a
/// warning: opening one's own device needs nothing); and it never advises
/// removing a path that is not the clone device's own (it said
/// `rm /dev/null && mknod /dev/null c 10 200`).
#[test]
fn doctor_names_what_is_missing_and_why() {
    require_root!();
    let lab = Lab::new();
    let ns = lab.netns("a");
    let run = |pre: &[&str], args: &[&str]| {
        let mut cmd = ns.cmd(pre[0]);
        cmd.args(&pre[1..]).arg(TAPIR).args(args);
        run_output(cmd.output().unwrap())
    };
    let r = run(&["unshare", "-Ur"], &["doctor"]);
    assert!(
        !r.ok
            && r.stdout.contains("FAIL  CAP_NET_ADMIN")
            && r.stdout.contains("does not own this network namespace"),
        "{}",
        r.stdout
    );
    let r = run(&["unshare", "-Urn"], &["doctor"]);
    assert!(r.stdout.contains("ok    CAP_NET_ADMIN"), "{}", r.stdout);
    let r = run(
        &[
            "setpriv",
            "--bounding-set",
            "-net_admin",
            "--inh-caps",
            "-net_admin",
        ],
        &["doctor"],
    );
    assert!(
        !r.ok && r.stdout.contains("though root") && !r.stdout.contains("sudo"),
        "{}",
        r.stdout
    );
    let r = tapir_as_nobody(&ns, &["doctor"]);
    assert!(
        r.ok && r.stdout.contains("warn  CAP_NET_ADMIN") && !r.stdout.contains("FAIL"),
        "{}",
        r.stdout
    );
    // (It ended "everything tapir needs is here" under its warnings.)
    assert!(
        r.stdout.trim_end().ends_with("within the warnings above"),
        "{}",
        r.stdout
    );
    // A clone device path that is not there: not made there (it said
    // `mkdir -p / && mknod /nonexistent ...`).
    let r = run(&["env"], &["doctor", "--tun-path", "/nonexistent"]);
    assert!(
        !r.ok && !r.stdout.contains("mkdir -p / ") && r.stdout.contains("--tun-path /dev/net/tun"),
        "{}",
        r.stdout
    );
    let r = run(&["env"], &["doctor", "--tun-path", "/dev/null"]);
    assert!(
        !r.ok && !r.stdout.contains("rm /dev/null") && r.stdout.contains("--tun-path /dev/net/tun"),
        "{}",
        r.stdout
    );
}

#[test]
fn list_and_show_report_what_the_kernel_has() {
    require_root!();
    let lab = Lab::new();
    let ns = lab.netns("a");
    ok(
        &ns,
        &[
            "dev",
            "add",
            "tap7",
            "--mode",
            "tap",
            "--multi-queue",
            "--user",
            NOBODY,
        ],
    );
    ok(&ns, &["dev", "add", "tun7", "--mode", "tun", "--vnet-hdr"]);
    ok(
        &ns,
        &[
            "dev",
            "set",
            "tun7",
            "--up",
            "--addr",
            "10.3.0.1/24",
            "--route",
            "10.4.0.0/16",
        ],
    );
    let list: Value = serde_json::from_str(&ok(&ns, &["dev", "list", "--json"])).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["ifname"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tap7", "tun7"]);
    let tap = &list[0];
    let kernel = &ns.ip_json(&["link", "show", "dev", "tap7"])[0];
    assert_eq!(tap["address"], kernel["address"]);
    assert_eq!(tap["mtu"], kernel["mtu"]);
    assert_eq!(tap["owner"]["id"], 65534);
    assert_eq!(tap["multi_queue"], true);
    assert_eq!(tap["queues"], 0);
    assert_eq!(tap["open"], false);
    let tun = &list[1];
    assert_eq!(tun["addresses"][0]["local"], "10.3.0.1");
    assert_eq!(tun["addresses"][0]["prefixlen"], 24);
    assert!(
        tun["routes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == "10.4.0.0/16")
    );
    assert_eq!(tun["up"], true);
    assert_eq!(tun["open"], false, "nobody has it open");

    let text = ok(&ns, &["dev", "list"]);
    assert!(text.lines().next().unwrap().starts_with("NAME"), "{text}");
    assert!(
        text.contains("tap7")
            && text.contains("persist,multi_queue")
            && text.contains("10.3.0.1/24"),
        "{text}"
    );

    // Open it, as a program would: show says so.
    ns.run(|| {
        let tun = tapir_sys::TunDevice::open(
            std::path::Path::new(tapir_sys::DEFAULT_TUN_PATH),
            &tapir_sys::IfName::new("tun7").unwrap(),
            tapir_sys::TunOptions {
                vnet_hdr: true,
                ..tapir_sys::TunOptions::new(tapir_sys::Mode::Tun)
            },
        )
        .unwrap();
        let shown: Value =
            serde_json::from_str(&ok(&ns, &["dev", "show", "tun7", "--json"])).unwrap();
        assert_eq!(shown["open"], true);
        assert_eq!(shown["carrier"], true);
        let text = ok(&ns, &["dev", "show", "tun7"]);
        assert!(text.contains("open    yes"), "{text}");
        let mq = tapir_sys::TunDevice::open(
            std::path::Path::new(tapir_sys::DEFAULT_TUN_PATH),
            &tapir_sys::IfName::new("tap7").unwrap(),
            tapir_sys::TunOptions {
                multi_queue: true,
                ..tapir_sys::TunOptions::new(tapir_sys::Mode::Tap)
            },
        )
        .unwrap();
        let text = ok(&ns, &["dev", "list"]);
        assert!(
            text.lines()
                .any(|l| l.starts_with("tap7") && l.contains("yes(1)")),
            "{text}"
        );
        drop((tun, mq));
    });
    let text = ok(&ns, &["dev", "show", "tun7"]);
    assert!(text.contains("open    no"), "{text}");
    let e = fails(&ns, &["dev", "show", "lo"]);
    assert!(e.contains("not tun/tap"), "{e}");
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    // Under target/, not /tmp: a nodev /tmp (tmpfs on Debian trixie) would
    // refuse the device node of the ownership test.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("tapir-test-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Not a test of its own (hence ignored): the child process of
/// `an_unprivileged_owner_can_open_its_device`, which runs this binary with
/// `--ignored --exact child_attach_as_user` as another user. It attaches to
/// the device named in the environment and reports the kernel's flags.
#[test]
#[ignore = "run as a child process by an_unprivileged_owner_can_open_its_device"]
fn child_attach_as_user() {
    let (Ok(name), Ok(path)) = (
        std::env::var("TAPIR_CHILD_DEV"),
        std::env::var("TAPIR_CHILD_TUN_PATH"),
    ) else {
        return;
    };
    let opts = tapir_sys::TunOptions::new(tapir_sys::Mode::Tun);
    match tapir_sys::TunDevice::open(
        std::path::Path::new(&path),
        &tapir_sys::IfName::new(&name).unwrap(),
        opts,
    ) {
        Ok(dev) => {
            let (o, persist) = dev.kernel_flags().unwrap();
            println!(
                "CHILD-ATTACHED {} mode={} persist={persist}",
                dev.name(),
                o.mode
            );
        }
        Err(e) => println!("CHILD-REFUSED {e}"),
    }
}

#[test]
fn an_unprivileged_owner_can_open_its_device() {
    require_root!();
    let lab = Lab::new();
    let ns = lab.netns("a");
    ok(
        &ns,
        &["dev", "add", "mine0", "--mode", "tun", "--user", NOBODY],
    );
    // Owned by root: nobody may not attach. (A device with neither owner nor
    // group is open to anyone who can open the clone device: the kernel's rule.)
    ok(
        &ns,
        &["dev", "add", "root0", "--mode", "tun", "--user", "0"],
    );
    // This machine's /dev/net/tun may be root-only (0600); a node of our own
    // with the usual 0666 mode shows the kernel's ownership check alone.
    let dir = tempdir("node");
    let node = dir.join("tun");
    let st = std::process::Command::new("mknod")
        .args([node.to_str().unwrap(), "c", "10", "200"])
        .status()
        .unwrap();
    assert!(st.success());
    std::process::Command::new("chmod")
        .args(["0666", node.to_str().unwrap()])
        .status()
        .unwrap();

    let me = std::env::current_exe().unwrap();
    let child = |dev: &str| {
        let out = ns
            .cmd("setpriv")
            .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
            .arg(&me)
            .args([
                "--exact",
                "child_attach_as_user",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("TAPIR_CHILD_DEV", dev)
            .env("TAPIR_CHILD_TUN_PATH", &node)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = child("mine0");
    assert!(
        out.contains("CHILD-ATTACHED mine0 mode=tun persist=true"),
        "{out}"
    );
    let out = child("root0");
    assert!(
        out.contains("CHILD-REFUSED TUNSETIFF on root0: Operation not permitted"),
        "{out}"
    );
    assert!(
        out.contains("tapir dev add NAME --user YOU"),
        "the refusal says what to do: {out}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// `[[device]]` tables: `tapir up FILE` twice changes nothing the second
/// time, corrects drift, refuses what it cannot correct, leaves no process,
/// gives what `ip tuntap add` gives, and `tapir down FILE` removes them.
#[test]
fn declared_devices_come_up_idempotently_and_go_with_down() {
    require_root!();
    let lab = Lab::new();
    let ns = lab.netns("a");
    let dir = tempdir("decl");
    let file = dir.join("devices.toml");
    std::fs::write(
        &file,
        format!(
            "[[device]]\nname = \"vmtap0\"\nmode = \"tap\"\nuser = \"{NOBODY}\"\nmulti_queue = true\nvnet_hdr = true\n\
             mtu = 1400\naddresses = [\"10.98.0.1/24\"]\nroutes = [\"10.98.5.0/24\"]\n\n\
             [[device]]\nname = \"mine1\"\nmode = \"tun\"\nuser = \"{NOBODY}\"\nup = false\n"
        ),
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let out = ok(&ns, &["up", f]);
    assert!(
        out.contains("vmtap0: created") && out.contains("mine1: created"),
        "{out}"
    );
    let link = |name: &str| ns.ip_json(&["link", "show", name])[0].clone();
    let tap = link("vmtap0");
    assert_eq!(tap["mtu"], 1400);
    assert!(tap["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
    assert!(ns.ip(&["addr", "show", "vmtap0"]).contains("10.98.0.1/24"));
    assert!(ns.ip(&["route", "show", "10.98.5.0/24"]).contains("vmtap0"));
    // What `ip tuntap add` gives for the same words.
    ns.ip(&[
        "tuntap",
        "add",
        "dev",
        "iptap0",
        "mode",
        "tap",
        "user",
        NOBODY,
        "multi_queue",
        "vnet_hdr",
    ]);
    let info = |v: &Value| v["linkinfo"]["info_data"].clone();
    let (ours, theirs) = (info(&tap), info(&link("iptap0")));
    for k in ["type", "pi", "vnet_hdr", "multi_queue", "persist", "user"] {
        assert_eq!(ours[k], theirs[k], "{k}: {ours} vs {theirs}");
    }
    ns.ip(&["link", "del", "iptap0"]);
    // No process stays behind: the devices are persistent.
    let pids = std::process::Command::new("ip")
        .args(["netns", "pids", ns.name()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&pids.stdout).trim().is_empty());
    // Again: nothing to do.
    let out = ok(&ns, &["up", f]);
    assert!(
        out.contains("vmtap0: unchanged") && out.contains("mine1: unchanged"),
        "{out}"
    );
    // Drift is corrected.
    ns.ip(&["link", "set", "vmtap0", "mtu", "1500"]);
    ns.ip(&["addr", "add", "10.97.0.1/24", "dev", "vmtap0"]);
    let out = ok(&ns, &["up", f]);
    assert!(
        out.contains("vmtap0: corrected (mtu 1500 to 1400, address 10.97.0.1/24 removed)"),
        "{out}"
    );
    // The owner attaches without root (a node of its own with mode 0666, as
    // many distributions ship /dev/net/tun).
    let node = dir.join("tun");
    assert!(
        std::process::Command::new("mknod")
            .args([node.to_str().unwrap(), "c", "10", "200"])
            .status()
            .unwrap()
            .success()
    );
    std::process::Command::new("chmod")
        .args(["0666", node.to_str().unwrap()])
        .status()
        .unwrap();
    let out = ns
        .cmd("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_attach_as_user",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("TAPIR_CHILD_DEV", "mine1")
        .env("TAPIR_CHILD_TUN_PATH", &node)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("CHILD-ATTACHED mine1 mode=tun persist=true"),
        "{text}"
    );
    // Down removes them; a device of that name with other flags is refused, untouched.
    let out = ok(&ns, &["down", f]);
    assert!(
        out.contains("vmtap0: deleted") && out.contains("mine1: deleted"),
        "{out}"
    );
    assert!(!ns.has_link("vmtap0") && !ns.has_link("mine1"));
    ok(&ns, &["dev", "add", "vmtap0", "--mode", "tun"]);
    let e = fails(&ns, &["up", f]);
    assert!(e.contains("wanted mode tap, has tun"), "{e}");
    assert!(
        !ns.has_link("mine1"),
        "a failed up leaves nothing it created"
    );
    assert_eq!(
        link("vmtap0")["linkinfo"]["info_data"]["type"],
        "tun",
        "not clobbered"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A declaration the kernel refuses part of leaves nothing it created,
/// mistakes it can see in the file are refused before anything is made,
/// an owner it cannot take away is said so (not "corrected"), and `down`
/// keeps a device open in a process of another namespace and goes on past
/// a device it cannot delete.
#[test]
fn declared_devices_fail_whole_and_down_keeps_what_is_held() {
    require_root!();
    let lab = Lab::new();
    let ns = lab.netns("a");
    let dir = tempdir("decl2");
    let write = |name: &str, text: &str| {
        let f = dir.join(name);
        std::fs::write(&f, text).unwrap();
        f.to_str().unwrap().to_owned()
    };
    // Seen in the file: nothing is made.
    let twice = write(
        "twice.toml",
        "[[device]]\nname = \"bd0\"\nmode = \"tun\"\naddresses = [\"10.70.0.1/24\", \"10.70.0.1/16\"]\n",
    );
    let e = fails(&ns, &["up", &twice]);
    assert!(e.contains("given twice") && e.contains("twice.toml"), "{e}");
    let big = write(
        "big.toml",
        "[[device]]\nname = \"bd0\"\nmode = \"tap\"\nmtu = 65535\n",
    );
    let e = fails(&ns, &["up", &big]);
    assert!(e.contains("at most 65521"), "{e}");
    let v6 = write(
        "v6.toml",
        "[[device]]\nname = \"bd0\"\nmode = \"tun\"\nmtu = 1200\naddresses = [\"fd70::1/64\"]\n",
    );
    let e = fails(&ns, &["up", &v6]);
    assert!(e.contains("1280"), "{e}");
    // Refused by the kernel once the device is there (a route lo holds):
    // the device goes again.
    ns.ip(&["link", "set", "lo", "up"]);
    ns.ip(&["route", "add", "10.99.7.0/24", "dev", "lo"]);
    let taken = write(
        "taken.toml",
        "[[device]]\nname = \"bd0\"\nmode = \"tun\"\nroutes = [\"10.99.7.0/24\"]\n",
    );
    let e = fails(&ns, &["up", &taken]);
    assert!(!e.contains("bd0: bd0:"), "named once: {e}");
    assert!(!ns.has_link("bd0"), "a failed up leaves nothing it created");
    // An owner the file does not declare stays, and is said to.
    let owned = write(
        "owned.toml",
        &format!("[[device]]\nname = \"bd1\"\nmode = \"tap\"\nuser = \"{NOBODY}\"\n"),
    );
    ok(&ns, &["up", &owned]);
    let plain = write(
        "plain.toml",
        "[[device]]\nname = \"bd1\"\nmode = \"tap\"\n\n[[device]]\nname = \"bd2\"\nmode = \"tun\"\n",
    );
    let out = ok(&ns, &["up", &plain]);
    assert!(
        out.contains(&format!("bd1: unchanged; user {NOBODY} kept")) && !out.contains("corrected"),
        "{out}"
    );
    assert_eq!(info_data(&ns, "bd1")["user"], "nobody");
    // Held by this process, which is of the host's namespace: kept.
    let path = ns.path();
    let held = std::thread::spawn(move || {
        tapir_sys::netns::enter(&path).unwrap();
        let name = tapir_sys::IfName::new("bd1").unwrap();
        tapir_sys::TunDevice::open(
            std::path::Path::new("/dev/net/tun"),
            &name,
            tapir_sys::TunOptions::new(tapir_sys::Mode::Tap),
        )
        .unwrap()
    })
    .join()
    .unwrap();
    // bd2 is a bridge by now: it cannot go, and the others are still taken down.
    ns.ip(&["link", "del", "bd2"]);
    ns.ip(&["link", "add", "bd2", "type", "bridge"]);
    let r = tapir(&ns, &["down", &plain]);
    assert!(!r.ok, "{}", r.stdout);
    assert!(
        r.stdout
            .contains("bd1: kept: a process of another network namespace holds it open"),
        "{}",
        r.stdout
    );
    assert!(r.stderr.contains("bd2"), "{}", r.stderr);
    assert!(ns.has_link("bd1") && ns.has_link("bd2"));
    drop(held);
    let out = ok(&ns, &["down", &owned]);
    assert!(out.contains("bd1: deleted"), "{out}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A multi-queue device whose one queue its holder detached is still open:
/// show says so, and del refuses it, and with --force warns, as it does for
/// attached queues.
#[test]
fn a_detached_queue_is_still_an_open_device() {
    require_root!();
    let lab = Lab::new();
    let ns = lab.netns("a");
    ok(
        &ns,
        &["dev", "add", "mq0", "--mode", "tap", "--multi-queue"],
    );
    // TUNSETIFF (IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE), then TUNSETQUEUE
    // with IFF_DETACH_QUEUE; held until its standard input closes.
    let script = "import fcntl, os, struct, sys\n\
        fd = os.open('/dev/net/tun', os.O_RDWR)\n\
        fcntl.ioctl(fd, 0x400454ca, struct.pack('16sH22x', b'mq0', 0x0002 | 0x1000 | 0x0100))\n\
        fcntl.ioctl(fd, 0x400454d9, struct.pack('16sH22x', b'', 0x0400))\n\
        print('ready', flush=True)\n\
        sys.stdin.read()\n";
    let mut child = ns
        .cmd("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready");
    let out = ok(&ns, &["dev", "show", "mq0"]);
    assert!(
        out.contains("yes: 0 queue(s) attached, 1 detached"),
        "{out}"
    );
    // Held, it is not deleted unasked, as `ip tuntap del` refuses it (it
    // went, and its holder's reads failed), and who holds it is named.
    let e = fails(&ns, &["dev", "del", "mq0"]);
    assert!(
        e.contains(&format!("mq0 is open in python3({})", child.id())) && e.contains("--force"),
        "{e}"
    );
    assert!(ns.has_link("mq0"));
    let r = tapir(&ns, &["dev", "del", "mq0", "--force"]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stderr.contains("had 1 queue(s) open"), "{}", r.stderr);
    drop(child.stdin.take());
    child.wait().unwrap();
}

/// Deleting a primary IPv4 address takes the secondaries of its prefix
/// with it: `dev set` says so, and a declaration puts back the declared
/// one it took (it said "corrected" and left the device with no address).
#[test]
fn what_goes_with_a_primary_address_is_said_and_put_back() {
    require_root!();
    let lab = Lab::new();
    let ns = lab.netns("a");
    ok(&ns, &["dev", "add", "sc0", "--mode", "tun"]);
    ok(
        &ns,
        &[
            "dev",
            "set",
            "sc0",
            "--addr",
            "10.77.0.1/24",
            "--addr",
            "10.77.0.2/24",
        ],
    );
    let r = tapir(&ns, &["dev", "set", "sc0", "--del-addr", "10.77.0.1/24"]);
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stderr.contains("address 10.77.0.2/24 went with it"),
        "{}",
        r.stderr
    );
    let dir = tempdir("second");
    let file = dir.join("d.toml");
    std::fs::write(
        &file,
        "[[device]]\nname = \"sc0\"\nmode = \"tun\"\naddresses = [\"10.90.0.1/24\"]\n",
    )
    .unwrap();
    ok(
        &ns,
        &[
            "dev",
            "set",
            "sc0",
            "--addr",
            "10.90.0.5/24",
            "--addr",
            "10.90.0.1/24",
        ],
    );
    let out = ok(&ns, &["up", file.to_str().unwrap()]);
    assert!(out.contains("address 10.90.0.5/24 removed"), "{out}");
    let addrs = ns.ip(&["-4", "addr", "show", "sc0"]);
    assert!(
        addrs.contains("10.90.0.1/24") && !addrs.contains("10.90.0.5"),
        "{addrs}"
    );
    let out = ok(&ns, &["up", file.to_str().unwrap()]);
    assert!(out.contains("sc0: unchanged"), "{out}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// An IPv6 address with a peer and a route via that peer in one `dev set`
/// (it failed every time, "No route to host": the kernel makes its route to
/// the peer only once the address is checked): the route is made on the
/// link; on a device that is down, what to do is said.
#[test]
fn an_ipv6_peer_and_a_route_via_it_in_one_set() {
    require_root!();
    let lab = Lab::new();
    let ns = lab.netns("a");
    let set = [
        "--addr",
        "fd01::1",
        "--peer",
        "fd01::2",
        "--route",
        "fd02::/64",
        "--via",
        "fd01::2",
    ];
    ok(&ns, &["dev", "add", "tun6", "--mode", "tun"]);
    ok(&ns, &[&["dev", "set", "tun6", "--up"][..], &set].concat());
    let routes = ns.ip_json(&["-6", "route", "show", "dev", "tun6"]);
    assert!(
        routes
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == "fd02::/64" && r["gateway"] == "fd01::2"),
        "{routes}"
    );
    ok(&ns, &["dev", "add", "tun7", "--mode", "tun"]);
    let e = fails(&ns, &[&["dev", "set", "tun7"][..], &set].concat());
    assert!(e.contains("--up") && e.contains("as it was"), "{e}");
}
