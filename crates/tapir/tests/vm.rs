//! Networks for VMs: NAT for a guest subnet, reversible, in namespaces.
//!
//! ```text
//!   g ("guest") 192.168.77.2 ── 192.168.77.1 h ("host") 10.213.0.1 ── 10.213.0.2 i ("internet")
//! ```

mod support;

use std::path::Path;
use std::process::Output;

use netlab::{Netns, require_root};
use support::*;

fn tapir_in(ns: &Netns, dir: &Path, args: &[&str]) -> Output {
    ns.cmd(env!("CARGO_BIN_EXE_tapir"))
        .args(args)
        .env("TAPIR_RUN_DIR", dir.join("run"))
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

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
    // Disabling what is not enabled says so, and succeeds.
    let out = ok(&tapir_in(h, dir, &["nat", "disable"]));
    assert!(out.contains("was not enabled"), "{out}");
}
