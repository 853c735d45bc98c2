//! The tunnel against stock WireGuard (wireguard-go and wg from Debian) and
//! against itself, in two namespaces joined by a veth:
//!
//! ```text
//!   ns a: va 10.200.0.1 ── veth ── vb 10.200.0.2 :ns b
//!         tunnel 10.77.0.1  ═══════  tunnel 10.77.0.2
//! ```

use std::io::Write;
use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use netlab::require_root;

mod support;
use support::*;

#[test]
fn tapir_initiates_to_wireguard_go() {
    require_root!();
    let bed = bed("init");
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let a = Side {
        ns: &bed.a,
        name: ifname("tpa"),
        port: 51820,
        addr: "10.77.0.1",
    };
    let b = Side {
        ns: &bed.b,
        name: ifname("wgi"),
        port: 51821,
        addr: "10.77.0.2",
    };
    let _wg = wireguard_go(&bed, &b, &kb, &pa, None, "10.77.0.1/32");
    let mut tp = tapir(&bed, &a, &ka, &pb, Some("10.200.0.2:51821"), "10.77.0.2/32");
    ping(&bed.a, "10.77.0.2");
    ping(&bed.b, "10.77.0.1");
    let show = sh(bed.b.cmd("wg").args(["show", &b.name, "dump"]));
    let peer_line = show.lines().nth(1).unwrap();
    let fields: Vec<&str> = peer_line.split('\t').collect();
    assert_eq!(fields[0], pa);
    assert_eq!(fields[2], "10.200.0.1:51820", "endpoint learned from tapir");
    assert!(
        fields[4].parse::<u64>().unwrap() > 0,
        "a handshake happened: {peer_line}"
    );
    let log = tp.stop();
    assert!(!log.contains(&ka), "the private key is never logged");
    assert!(
        !bed.a.has_link(&a.name),
        "the interface is gone after SIGTERM"
    );
}

#[test]
fn wireguard_go_initiates_to_tapir() {
    require_root!();
    let bed = bed("resp");
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let a = Side {
        ns: &bed.a,
        name: ifname("tpr"),
        port: 51820,
        addr: "10.77.0.1",
    };
    let b = Side {
        ns: &bed.b,
        name: ifname("wgr"),
        port: 51821,
        addr: "10.77.0.2",
    };
    let _tp = tapir(&bed, &a, &ka, &pb, None, "10.77.0.2/32");
    let _wg = wireguard_go(&bed, &b, &kb, &pa, Some("10.200.0.1:51820"), "10.77.0.1/32");
    ping(&bed.b, "10.77.0.1");
    ping(&bed.a, "10.77.0.2");
}

#[test]
fn a_burst_after_lone_packets_arrives_whole() {
    require_root!();
    let bed = bed("lone");
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let (a, b) = tapir_sides(&bed, "tl0".into(), "tl0".into());
    let ta = tapir(&bed, &a, &ka, &pb, Some("10.200.0.2:51820"), "10.77.0.2/32");
    let tb = tapir(&bed, &b, &kb, &pa, Some("10.200.0.1:51820"), "10.77.0.1/32");
    // Pings one at a time: each end learns that a wake-up brings one
    // packet and that its writes have no answer (the pinging end), and
    // stops reading for more, and receives by recvfrom with UDP GRO off
    // (lone mode); then 100 requests at once (preload), a bulk transfer
    // (GRO on again), and lone ones again. Any packet left unread on the
    // device would be lost to ping's deadline; a coalesced datagram read
    // as one would not open.
    let pings = |args: &[&str]| {
        let out = bed.a.cmd("ping").args(args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(" 0% packet loss"),
            "ping {args:?}: {text}"
        );
    };
    let lone_modes = || {
        [(&bed.a, &ta), (&bed.b, &tb)].map(|(ns, t)| {
            status_json(ns, &bed.dir, "tl0", t)["counters"]["udp_lone_mode"]
                .as_u64()
                .unwrap_or(0)
        })
    };
    pings(&["-c", "100", "-i", "0.01", "-W", "3", "10.77.0.2"]);
    let [la, lb] = lone_modes();
    assert!(la >= 1 && lb >= 1, "lone mode on each end: {la}, {lb}");
    pings(&[
        "-c",
        "150",
        "-l",
        "100",
        "-i",
        "0.01",
        "-W",
        "3",
        "10.77.0.2",
    ]);
    transfer(&bed.a, &bed.b, "10.77.0.2:5001", 20 << 20);
    pings(&["-c", "100", "-i", "0.01", "-W", "3", "10.77.0.2"]);
    let [la2, lb2] = lone_modes();
    assert!(
        la2 > la && lb2 > lb,
        "lone mode left for the burst and taken again: {la2}, {lb2}"
    );
    for (ns, t) in [(&bed.a, &ta), (&bed.b, &tb)] {
        let st = status_json(ns, &bed.dir, "tl0", t);
        let drops = &st["peers"][0]["drops"];
        assert!(
            drops["invalid"].is_null(),
            "datagrams that did not open: {st}"
        );
    }
}

#[test]
fn tapir_to_tapir_with_100_mb_both_ways() {
    require_root!();
    let bed = bed("tt");
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let (a, b) = tapir_sides(&bed, "tp0".into(), "tp0".into());
    let ta = tapir(&bed, &a, &ka, &pb, Some("10.200.0.2:51820"), "10.77.0.2/32");
    let _tb = tapir(&bed, &b, &kb, &pa, Some("10.200.0.1:51820"), "10.77.0.1/32");
    ping(&bed.a, "10.77.0.2");
    let turns = |c: &serde_json::Value| {
        (
            c["device_to_outbound_thread"].as_u64().unwrap(),
            c["device_back_to_network_thread"].as_u64().unwrap(),
        )
    };
    let two_threads = std::env::var("TAPIR_THREADS").as_deref() != Ok("1");
    // One way only: the sender's other direction is ACKs, and its network
    // thread keeps the device (a second thread would only contend for it).
    transfer(&bed.a, &bed.b, "10.77.0.2:5001", 30 << 20);
    if two_threads {
        let c = status_json(&bed.a, &bed.dir, "tp0", &ta)["counters"].clone();
        assert_eq!(
            turns(&c).0,
            0,
            "one busy direction handed the device over: {c}"
        );
    }
    // Both ways at once: with a thread per direction, sealing and opening
    // run side by side on each end.
    std::thread::scope(|s| {
        s.spawn(|| transfer(&bed.a, &bed.b, "10.77.0.2:5001", 100 << 20));
        s.spawn(|| transfer(&bed.b, &bed.a, "10.77.0.1:5001", 100 << 20));
    });
    // The datapath says which shape it has (scripts/test.sh runs this file
    // with TAPIR_THREADS=1 too).
    // With a thread per direction, the bulk transfer handed the device to
    // the outbound thread, and the quiet after it handed it back.
    if two_threads {
        wait_for(
            || {
                let c = status_json(&bed.a, &bed.dir, "tp0", &ta)["counters"].clone();
                let (out, back) = turns(&c);
                out >= 1 && back == out
            },
            "the device back with the network thread after the transfer",
        );
    }
    let status = status_text(&bed.a, &bed.dir, "tp0", &ta);
    let shape = match std::env::var("TAPIR_THREADS").as_deref() {
        Ok("1") => "one thread for both directions",
        _ => "a thread per direction",
    };
    assert!(status.contains(shape), "{status}");
}

#[test]
fn bulk_transfer_with_wireguard_go() {
    require_root!();
    let bed = bed("bulk");
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let a = Side {
        ns: &bed.a,
        name: ifname("tpb"),
        port: 51820,
        addr: "10.77.0.1",
    };
    let b = Side {
        ns: &bed.b,
        name: ifname("wgb"),
        port: 51821,
        addr: "10.77.0.2",
    };
    // With a preshared key from tapir genpsk on both sides.
    let psk = sh(Command::new(TAPIR).arg("genpsk"));
    let _wg = wireguard_go_psk(&bed, &b, &kb, &pa, None, "10.77.0.1/32", Some(&psk));
    let _tp = tapir_psk(
        &bed,
        &a,
        &ka,
        &pb,
        Some("10.200.0.2:51821"),
        "10.77.0.2/32",
        Some(&psk),
    );
    ping(&bed.a, "10.77.0.2");
    transfer(&bed.a, &bed.b, "10.77.0.2:5001", 100 << 20);
    transfer(&bed.b, &bed.a, "10.77.0.1:5001", 100 << 20);
}

#[test]
fn a_restarted_tapir_resumes_without_touching_the_peer() {
    require_root!();
    let bed = bed("restart");
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let a = Side {
        ns: &bed.a,
        name: ifname("tps"),
        port: 51820,
        addr: "10.77.0.1",
    };
    let b = Side {
        ns: &bed.b,
        name: ifname("wgs"),
        port: 51821,
        addr: "10.77.0.2",
    };
    let _wg = wireguard_go(&bed, &b, &kb, &pa, Some("10.200.0.1:51820"), "10.77.0.1/32");
    let mut tp = tapir(&bed, &a, &ka, &pb, Some("10.200.0.2:51821"), "10.77.0.2/32");
    ping(&bed.a, "10.77.0.2");
    tp.stop();
    let _tp = tapir(&bed, &a, &ka, &pb, Some("10.200.0.2:51821"), "10.77.0.2/32");
    let started = Instant::now();
    ping(&bed.a, "10.77.0.2");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "resumed in {:?}",
        started.elapsed()
    );
    // And the peer's traffic to us resumes too.
    ping(&bed.b, "10.77.0.1");
}

#[test]
fn forged_replayed_and_truncated_datagrams_change_nothing() {
    require_root!();
    let bed = bed("forge");
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let a = Side {
        ns: &bed.a,
        name: ifname("tpf"),
        port: 51820,
        addr: "10.77.0.1",
    };
    let b = Side {
        ns: &bed.b,
        name: ifname("wgf"),
        port: 51821,
        addr: "10.77.0.2",
    };
    let _wg = wireguard_go(&bed, &b, &kb, &pa, Some("10.200.0.1:51820"), "10.77.0.1/32");
    let _tp = tapir(&bed, &a, &ka, &pb, Some("10.200.0.2:51821"), "10.77.0.2/32");
    ping(&bed.a, "10.77.0.2");
    let replies = bed.b.run(|| {
        let sock = UdpSocket::bind("10.200.0.2:40000").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut x: u64 = 77;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..3000usize {
            let len = match i % 6 {
                0 => 148, // initiation-sized garbage
                1 => 92,
                2 => 64,
                3 => 32 + (i % 200),
                4 => i % 40,
                _ => 1 + (i % 1500),
            };
            let mut d: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(first) = d.first_mut() {
                *first = (i % 5) as u8;
            }
            if d.len() >= 4 {
                d[1..4].fill(0);
            }
            sock.send_to(&d, "10.200.0.1:51820").unwrap();
        }
        let mut buf = [0u8; 2048];
        let mut replies = 0;
        while sock.recv_from(&mut buf).is_ok() {
            replies += 1;
        }
        replies
    });
    assert_eq!(replies, 0, "no reply to the unauthenticated");
    // Still working.
    ping(&bed.a, "10.77.0.2");
    ping(&bed.b, "10.77.0.1");
    // And counted, by kind, though no peer can be named for them.
    let st = status_text(&bed.a, &bed.dir, &a.name, &_tp);
    assert!(
        st.contains("dropped malformed")
            && st.contains("dropped bad handshake")
            && st.contains("dropped no session"),
        "{st}"
    );

    // Replays of real traffic: record what wireguard-go sends tapir during a
    // ping (handshake and data), then send it all again, twice, and truncated.
    let pcap = bed.dir.join("replay.pcap");
    let mut dump = Proc(Some(
        bed.b
            .cmd("tcpdump")
            .args([
                "-i",
                "vb",
                "-U",
                "-w",
                pcap.to_str().unwrap(),
                "udp and dst port 51820",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump"),
    ));
    std::thread::sleep(Duration::from_millis(500));
    ping(&bed.b, "10.77.0.1");
    std::thread::sleep(Duration::from_millis(300));
    dump.stop();
    let bytes = std::fs::read(&pcap).unwrap();
    let (linktype, records) = tapir_wire::pcap::read(&bytes).unwrap();
    assert_eq!(linktype, 1, "Ethernet capture on the veth");
    // Ethernet 14 + IPv4 20 + UDP 8 in front of each WireGuard message.
    let messages: Vec<Vec<u8>> = records
        .iter()
        .filter_map(|r| r.data.get(42..).map(<[u8]>::to_vec))
        .collect();
    assert!(messages.len() >= 3, "captured {} datagrams", messages.len());
    let replies = bed.b.run(|| {
        let sock = UdpSocket::bind("10.200.0.2:40001").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        for _ in 0..2 {
            for m in &messages {
                sock.send_to(m, "10.200.0.1:51820").unwrap();
                sock.send_to(&m[..m.len() / 2], "10.200.0.1:51820").unwrap();
            }
        }
        let mut buf = [0u8; 2048];
        let mut replies = 0;
        while sock.recv_from(&mut buf).is_ok() {
            replies += 1;
        }
        replies
    });
    assert_eq!(
        replies, 0,
        "replayed and truncated real datagrams get no reply"
    );
    ping(&bed.a, "10.77.0.2");
    ping(&bed.b, "10.77.0.1");
    let _ = &bed.lab;
}

/// The two ends of a tapir-to-tapir test: `a` in namespace a at
/// 10.77.0.1, `b` in namespace b at 10.77.0.2, both on port 51820.
fn tapir_sides(bed: &Bed, a: String, b: String) -> (Side<'_>, Side<'_>) {
    let side = |ns, name, addr| Side {
        ns,
        name,
        port: 51820,
        addr,
    };
    (side(&bed.a, a, "10.77.0.1"), side(&bed.b, b, "10.77.0.2"))
}

/// `tapir run` in namespace a of tunnel `name` with key `key`, port 51820,
/// 10.77.0.1/24 and no peer, once its device is there.
fn peerless(bed: &Bed, name: &str, key: &str) -> Proc {
    let conf = write_private(
        bed,
        &format!("{name}.conf"),
        &format!("[Interface]\nPrivateKey = {key}\nListenPort = 51820\nAddress = 10.77.0.1/24\n"),
    );
    let tp = Proc(Some(
        bed.a
            .cmd(TAPIR)
            .arg("run")
            .arg(&conf)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    wait_for(|| bed.a.has_link(name), "the tapir interface");
    tp
}

fn write_private(bed: &Bed, name: &str, text: &str) -> PathBuf {
    let path = bed.dir.join(name);
    std::fs::write(&path, text).unwrap();
    Command::new("chmod")
        .args(["600", path.to_str().unwrap()])
        .status()
        .unwrap();
    path
}

#[test]
fn two_tunnels_from_one_toml_file() {
    require_root!();
    let bed = bed("toml");
    let keys: Vec<(String, String)> = (0..4).map(|_| genkey()).collect();
    // a: tp0 <-> b: tp0 on 51820, a: tp1 <-> b: tp1 on 51821.
    let side = |me: usize, other: usize, peer_ip: &str, local: &str, remote: &str| {
        let mut t = String::new();
        for (i, port) in [(0, 51820), (1, 51821)] {
            t += &format!(
                "[[tunnel]]\nname = \"tp{i}\"\nprivate_key = \"{}\"\nlisten_port = {port}\naddresses = [\"10.7{i}.0.{local}/24\"]\n\n\
                 [[tunnel.peer]]\npublic_key = \"{}\"\nendpoint = \"{peer_ip}:{port}\"\nallowed_ips = [\"10.7{i}.0.{remote}/32\"]\n\n",
                keys[me + i].0,
                keys[other + i].1
            );
        }
        t
    };
    let fa = write_private(&bed, "a.toml", &side(0, 2, "10.200.0.2", "1", "2"));
    let fb = write_private(&bed, "b.toml", &side(2, 0, "10.200.0.1", "2", "1"));
    let _a = Proc(Some(
        bed.a
            .cmd(TAPIR)
            .arg("run")
            .arg(&fa)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    let _b = Proc(Some(
        bed.b
            .cmd(TAPIR)
            .arg("run")
            .arg(&fb)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    wait_for(
        || bed.a.has_link("tp1") && bed.b.has_link("tp1"),
        "both tunnels",
    );
    ping(&bed.a, "10.70.0.2");
    ping(&bed.a, "10.71.0.2");
    ping(&bed.b, "10.71.0.1");
}

#[test]
fn a_tunnel_that_cannot_start_takes_the_others_down() {
    require_root!();
    let bed = bed("fail");
    let ((k0, _), (_, p1), (k2, _)) = (genkey(), genkey(), genkey());
    // tp1's name is taken by a device that exists already.
    let out = bed
        .a
        .cmd(TAPIR)
        .args(["dev", "add", "tp1", "--mode", "tun"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = format!(
        "[[tunnel]]\nname = \"tp0\"\nprivate_key = \"{k0}\"\nlisten_port = 51820\naddresses = [\"10.70.0.1/24\"]\n\
         [[tunnel.peer]]\npublic_key = \"{p1}\"\nallowed_ips = [\"10.70.0.2/32\"]\n\n\
         [[tunnel]]\nname = \"tp1\"\nprivate_key = \"{k2}\"\nlisten_port = 51821\n"
    );
    let f = write_private(&bed, "fail.toml", &text);
    let out = bed.a.cmd(TAPIR).arg("run").arg(&f).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tp1 already exists"), "{err}");
    assert!(
        !bed.a.has_link("tp0"),
        "the tunnel started first is gone again"
    );
    // Its port is free again.
    bed.a
        .run(|| UdpSocket::bind("0.0.0.0:51820").expect("port 51820 released"));
}

#[test]
fn keys_are_interchangeable_with_wg() {
    for _ in 0..5 {
        let ours = sh(Command::new(TAPIR).arg("genkey"));
        assert_eq!(
            pipe(Command::new(TAPIR).arg("pubkey"), &ours),
            pipe(Command::new("wg").arg("pubkey"), &ours)
        );
        let theirs = sh(Command::new("wg").arg("genkey"));
        assert_eq!(
            pipe(Command::new(TAPIR).arg("pubkey"), &theirs),
            pipe(Command::new("wg").arg("pubkey"), &theirs)
        );
        let psk = sh(Command::new(TAPIR).arg("genpsk"));
        assert_eq!(psk.len(), 44);
        assert_ne!(psk, sh(Command::new(TAPIR).arg("genpsk")));
    }
}

#[test]
fn wg_show_and_wg_set_work_against_tapir() {
    require_root!();
    let bed = bed("uapi");
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let a = Side {
        ns: &bed.a,
        name: ifname("tpu"),
        port: 51820,
        addr: "10.77.0.1",
    };
    let b = Side {
        ns: &bed.b,
        name: ifname("wgu"),
        port: 51821,
        addr: "10.77.0.2",
    };
    // tapir starts with no peer at all.
    let _tp = peerless(&bed, &a.name, &ka);
    let _wg = wireguard_go(&bed, &b, &kb, &pa, Some("10.200.0.1:51820"), "10.77.0.1/32");
    // wg show sees the interface, and no peer yet.
    let dump = sh(bed.a.cmd("wg").args(["show", &a.name, "dump"]));
    let first: Vec<&str> = dump.lines().next().unwrap().split('\t').collect();
    assert_eq!(first[1], pa, "our public key: {dump}");
    assert_eq!(first[2], "51820");
    assert_eq!(dump.lines().count(), 1);
    // wg set adds the peer: traffic flows at once.
    sh(bed
        .a
        .cmd("wg")
        .args(["set", &a.name, "peer", &pb, "allowed-ips", "10.77.0.2/32"]));
    ping(&bed.b, "10.77.0.1");
    ping(&bed.a, "10.77.0.2");
    let dump = sh(bed.a.cmd("wg").args(["show", &a.name, "dump"]));
    let peer: Vec<&str> = dump.lines().nth(1).unwrap().split('\t').collect();
    assert_eq!(peer[0], pb);
    assert_eq!(peer[2], "10.200.0.2:51821", "endpoint learned: {dump}");
    assert_eq!(peer[3], "10.77.0.2/32");
    assert!(
        peer[4].parse::<u64>().unwrap() > 0,
        "latest handshake: {dump}"
    );
    assert!(
        peer[5].parse::<u64>().unwrap() > 0 && peer[6].parse::<u64>().unwrap() > 0,
        "transfer: {dump}"
    );
    let human = sh(bed.a.cmd("wg").args(["show", &a.name]));
    assert!(
        human.contains("latest handshake") && human.contains("private key: (hidden)"),
        "{human}"
    );
    // wg set removes it: traffic stops.
    sh(bed
        .a
        .cmd("wg")
        .args(["set", &a.name, "peer", &pb, "remove"]));
    let out = bed
        .a
        .cmd("ping")
        .args(["-c", "1", "-W", "1", "10.77.0.2"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "no peer, no traffic");
    // A new private key, and the peer back, in one set: the tunnel answers
    // under the new key once its peer knows it.
    let (other, other_pub) = genkey();
    let key = write_private(&bed, "other.key", &other);
    sh(bed.a.cmd("wg").args([
        "set",
        &a.name,
        "private-key",
        key.to_str().unwrap(),
        "peer",
        &pb,
        "allowed-ips",
        "10.77.0.2/32",
        "endpoint",
        &format!("10.200.0.2:{}", b.port),
    ]));
    assert_eq!(
        sh(bed.a.cmd("wg").args(["show", &a.name, "public-key"])).trim(),
        other_pub
    );
    sh(bed.b.cmd("wg").args([
        "set",
        &b.name,
        "peer",
        &pa,
        "remove",
        "peer",
        &other_pub,
        "allowed-ips",
        "10.77.0.1/32",
    ]));
    ping(&bed.a, "10.77.0.2");
    // A request tapir cannot honour (no key at all, which wg sends for
    // /dev/null, for a running tunnel) is refused, not half-applied: the
    // peer it removes stays.
    let out = bed
        .a
        .cmd("wg")
        .args([
            "set",
            &a.name,
            "private-key",
            "/dev/null",
            "peer",
            &pb,
            "remove",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(sh(bed.a.cmd("wg").args(["show", &a.name, "peers"])).contains(&pb));
}

#[test]
fn ipv6_inside_the_tunnel_with_tso() {
    require_root!();
    let bed = bed("v6");
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let mut procs = Vec::new();
    for (ns, key, peer, me, them, endpoint) in [
        (&bed.a, &ka, &pb, "fd77::1", "fd77::2", "10.200.0.2"),
        (&bed.b, &kb, &pa, "fd77::2", "fd77::1", "10.200.0.1"),
    ] {
        let _ = ns
            .cmd("sysctl")
            .args(["-qw", "net.ipv6.conf.all.disable_ipv6=0"])
            .status();
        let conf = write_private(
            &bed,
            &format!("tp6{}.conf", &me[6..]),
            &format!(
                "[Interface]\nPrivateKey = {key}\nListenPort = 51820\nAddress = {me}/64\n\n[Peer]\nPublicKey = {peer}\nEndpoint = {endpoint}:51820\nAllowedIPs = {them}/128\n"
            ),
        );
        let child = ns
            .cmd(TAPIR)
            .arg("run")
            .arg(&conf)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        procs.push(Proc(Some(child)));
    }
    wait_for(
        || bed.a.has_link("tp61") && bed.b.has_link("tp62"),
        "both tunnels",
    );
    let out = bed
        .a
        .cmd("ping")
        .args(["-6", "-c", "3", "-i", "0.2", "-W", "3", "fd77::2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    transfer(&bed.a, &bed.b, "[fd77::2]:5001", 50 << 20);
    transfer(&bed.b, &bed.a, "[fd77::1]:5001", 50 << 20);
}

/// Two tunnels of one name in two namespaces: `wg` in the second, which
/// finds the first's socket under the name, is told the interface is
/// another's ("Object is remote", where it met a closed connection); once
/// the first goes, the name is the second's and `wg show` there works.
#[test]
fn one_name_in_two_namespaces_wg_is_told_and_the_name_is_handed_over() {
    require_root!();
    let bed = bed("twons");
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let name = ifname("tpw");
    let (a, b) = tapir_sides(&bed, name.clone(), name.clone());
    let mut ta = tapir(&bed, &a, &ka, &pb, Some("10.200.0.2:51820"), "10.77.0.2/32");
    let _tb = tapir(&bed, &b, &kb, &pa, Some("10.200.0.1:51820"), "10.77.0.1/32");
    ping(&bed.a, "10.77.0.2");
    let show = |ns: &netlab::Netns| ns.cmd("wg").args(["show", &name]).output().unwrap();
    assert!(show(&bed.a).status.success(), "a holds the name");
    let out = show(&bed.b);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Object is remote"),
        "{err}"
    );
    ta.stop();
    let out = show(&bed.b);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&pa),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Without `MTU =`, as wg-quick: the MTU of the path toward the endpoint
/// less 80 (1420 on the usual 1500).
#[test]
fn without_an_mtu_the_tunnel_takes_the_paths_less_80() {
    require_root!();
    let bed = bed("amtu");
    let ((ka, _), (_, pb)) = (genkey(), genkey());
    let (a, _) = tapir_sides(&bed, ifname("tpu"), ifname("tpv"));
    for (veth, want) in [("1400", 1320), ("9000", 8920)] {
        bed.a.ip(&["link", "set", "va", "mtu", veth]);
        let mut t = tapir(&bed, &a, &ka, &pb, Some("10.200.0.2:51820"), "10.77.0.2/32");
        let link = bed.a.ip_json(&["link", "show", &a.name]);
        assert_eq!(link[0]["mtu"], want, "over a path of {veth}");
        t.stop();
    }
}

/// A packet of the tunnel's MTU leaves as one datagram of the MTU plus 32
/// bytes (padded to 16, but not past the MTU, as the kernel module and
/// wireguard-go pad), also after the MTU changes under the running tunnel:
/// over IPv6 at 1500 bytes, 1420 + 32 + 8 + 40 fits exactly, and the 1424
/// it was once padded to went out as two fragments, which this path drops.
#[test]
fn full_size_packets_are_not_padded_past_the_mtu() {
    require_root!();
    let bed = bed("pad");
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let (na, nb) = (ifname("tpm"), ifname("tpn"));
    let mut procs = Vec::new();
    for (ns, key, peer, dev, veth, me, them, at, there) in [
        (
            &bed.a,
            &ka,
            &pb,
            &na,
            "va",
            "10.77.0.1",
            "10.77.0.2",
            "fd78::1",
            "fd78::2",
        ),
        (
            &bed.b,
            &kb,
            &pa,
            &nb,
            "vb",
            "10.77.0.2",
            "10.77.0.1",
            "fd78::2",
            "fd78::1",
        ),
    ] {
        let _ = ns
            .cmd("sysctl")
            .args(["-qw", "net.ipv6.conf.all.disable_ipv6=0"])
            .status();
        ns.ip(&["addr", "add", &format!("{at}/64"), "dev", veth, "nodad"]);
        // Fragments dropped before they are put together.
        nft(
            ns,
            "table ip6 nofrag { chain c { type filter hook prerouting priority -450; exthdr frag exists drop; }; }",
        );
        // Started at 1500, then lowered as wg-quick does with its userspace
        // implementations: the tunnel must follow.
        let conf = write_private(
            &bed,
            &format!("{dev}.conf"),
            &format!(
                "[Interface]\nPrivateKey = {key}\nListenPort = 51820\nAddress = {me}/24\nMTU = 1500\n\n[Peer]\nPublicKey = {peer}\nEndpoint = [{there}]:51820\nAllowedIPs = {them}/32\n"
            ),
        );
        let child = ns
            .cmd(TAPIR)
            .arg("run")
            .arg(&conf)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        procs.push(Proc(Some(child)));
        wait_for(|| ns.has_link(dev), "the tunnel");
        ns.ip(&["link", "set", dev, "mtu", "1420"]);
    }
    ping(&bed.a, "10.77.0.2");
    // 1392 bytes of ICMP payload: IPv4 packets of exactly 1420, both ways.
    // The timers read the MTU again within a second (a few tries, for a
    // loaded machine).
    let big = || {
        bed.a
            .cmd("ping")
            .args([
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "2",
                "-M",
                "do",
                "-s",
                "1392",
                "10.77.0.2",
            ])
            .output()
            .unwrap()
    };
    std::thread::sleep(Duration::from_millis(1500));
    let mut out = big();
    for _ in 0..3 {
        if out.status.success() {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
        out = big();
    }
    assert!(
        out.status.success(),
        "full-size packets lost (fragmented?): {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `wg set NAME listen-port P` moves a running tunnel to P (its peer
/// follows the first packet from there), a port taken changes nothing, and
/// `wg syncconf` of a file without ListenPort (which sends `listen_port=0`)
/// keeps the port, as wg-quick's reload recipe needs; `wg set listen-port 0`
/// moves to one at random.
#[test]
fn wg_set_moves_the_listen_port_and_syncconf_keeps_it() {
    require_root!();
    let bed = bed("port");
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let (a, b) = tapir_sides(&bed, ifname("tpp"), ifname("tpq"));
    let _ta = tapir(&bed, &a, &ka, &pb, Some("10.200.0.2:51820"), "10.77.0.2/32");
    let _tb = tapir(&bed, &b, &kb, &pa, Some("10.200.0.1:51820"), "10.77.0.1/32");
    ping(&bed.a, "10.77.0.2");
    let wg = |args: &[&str]| bed.a.cmd("wg").args(args).output().unwrap();
    let port = || sh(bed.a.cmd("wg").args(["show", &a.name, "listen-port"]));
    let out = wg(&["set", &a.name, "listen-port", "40123"]);
    ok(&out);
    assert_eq!(port().trim(), "40123");
    // The old port is closed; the peer hears from the new one and answers there.
    ping(&bed.a, "10.77.0.2");
    assert!(sh(bed.b.cmd("wg").args(["show", &b.name, "endpoints"])).contains("10.200.0.1:40123"));
    // A port another socket holds: refused, nothing changed.
    let ns_path = bed.a.path();
    let holder = std::thread::spawn(move || {
        tapir_sys::netns::enter(&ns_path).unwrap();
        UdpSocket::bind("[::]:40200").unwrap()
    })
    .join()
    .unwrap();
    let out = wg(&["set", &a.name, "listen-port", "40200"]);
    assert!(!out.status.success());
    // (Answered -98, as wg reads a set's errno: a positive one it printed
    // as "Unknown error -98".)
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Address already in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(port().trim(), "40123");
    drop(holder);
    // wg-quick's reload recipe, with a file that names no port.
    let file = write_private(
        &bed,
        "sync.conf",
        &format!(
            "[Interface]\nPrivateKey = {ka}\n\n[Peer]\nPublicKey = {pb}\nEndpoint = 10.200.0.2:51820\nAllowedIPs = 10.77.0.2/32\n"
        ),
    );
    let out = wg(&["syncconf", &a.name, file.to_str().unwrap()]);
    ok(&out);
    assert_eq!(port().trim(), "40123");
    ping(&bed.a, "10.77.0.2");
    // `wg set NAME listen-port 0` asks for one at random, as of the kernel
    // (it kept the port and said nothing).
    ok(&wg(&["set", &a.name, "listen-port", "0"]));
    let moved: u16 = port().trim().parse().unwrap();
    assert!(moved != 40123 && moved != 0, "{moved}");
    ping(&bed.a, "10.77.0.2");
}

#[test]
fn a_stalled_control_client_does_not_stall_the_packets() {
    require_root!();
    let bed = bed("stall");
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let (a, b) = tapir_sides(&bed, ifname("tpx"), ifname("tpy"));
    let _ta = tapir(&bed, &a, &ka, &pb, Some("10.200.0.2:51820"), "10.77.0.2/32");
    let _tb = tapir(&bed, &b, &kb, &pa, Some("10.200.0.1:51820"), "10.77.0.1/32");
    ping(&bed.a, "10.77.0.2");
    // Clients that start a request and never finish it, one after another,
    // and one that sends an endless line.
    let sock = format!("/var/run/wireguard/{}.sock", a.name);
    let ns_path = bed.a.path();
    let stallers = std::thread::spawn(move || {
        // From the tunnel's namespace: it refuses clients of any other.
        tapir_sys::netns::enter(&ns_path).unwrap();
        let mut held = Vec::new();
        for _ in 0..5 {
            let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
            s.write_all(b"get=1\n").unwrap();
            held.push(s);
        }
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        let _ = s.write_all(&vec![b'a'; 1 << 20]);
        held.push(s);
        std::thread::sleep(Duration::from_secs(3));
        held
    });
    // Meanwhile the packets flow as before: every reply, none delayed by a second.
    let out = bed
        .a
        .cmd("ping")
        .args(["-c", "30", "-i", "0.1", "-W", "1", "10.77.0.2"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(" 0% packet loss"), "{text}");
    let max: f64 = text
        .lines()
        .find(|l| l.starts_with("rtt"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(2))
        .and_then(|m| m.parse().ok())
        .unwrap();
    assert!(max < 500.0, "a reply took {max} ms: {text}");
    drop(stallers.join().unwrap());
    // And the socket still answers once they are gone.
    let show = sh(bed.a.cmd("wg").args(["show", &a.name, "dump"]));
    assert!(show.contains(&pb), "{show}");
}

#[test]
fn idle_control_clients_do_not_hold_up_another() {
    require_root!();
    let bed = bed("idlec");
    let ((ka, _), (_, pb)) = (genkey(), genkey());
    let (a, _b) = tapir_sides(&bed, ifname("tpi"), ifname("tpj"));
    let _ta = tapir(&bed, &a, &ka, &pb, Some("10.200.0.2:51820"), "10.77.0.2/32");
    let sock = format!("/var/run/wireguard/{}.sock", a.name);
    let ns_path = bed.a.path();
    // Ten clients that start a request and never finish it, held for 8 s:
    // served one after another, each had 2 s, and a `wg show` waited 20 s.
    let released = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let holder = {
        let released = released.clone();
        std::thread::spawn(move || {
            tapir_sys::netns::enter(&ns_path).unwrap();
            let mut held: Vec<_> = (0..10)
                .map(|_| {
                    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
                    s.write_all(b"get=1\n").unwrap();
                    s
                })
                .collect();
            // And a hundred that send nothing, past the 16 threads: served
            // one after another on the control thread, each had its 2 s
            // (200 held a `wg show` 28 s).
            held.extend((0..100).map(|_| std::os::unix::net::UnixStream::connect(&sock).unwrap()));
            ready_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_secs(8));
            released.store(true, std::sync::atomic::Ordering::SeqCst);
            drop(held);
        })
    };
    ready.recv().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let show = sh(bed.a.cmd("wg").args(["show", &a.name, "dump"]));
    assert!(
        !released.load(std::sync::atomic::Ordering::SeqCst),
        "wg show answered only once the idle clients were gone"
    );
    assert!(show.contains(&pb), "{show}");
    holder.join().unwrap();
}

#[test]
fn a_stream_of_control_clients_does_not_starve_another() {
    require_root!();
    let bed = bed("flood");
    let ((ka, _), (_, pb)) = (genkey(), genkey());
    let (a, _b) = tapir_sides(&bed, ifname("tpf"), ifname("tpg"));
    let _ta = tapir(&bed, &a, &ka, &pb, Some("10.200.0.2:51820"), "10.77.0.2/32");
    let sock = format!("/var/run/wireguard/{}.sock", a.name);
    // 24 clients asking again and again for 6 s: more than the threads
    // (16), so some are served on the control thread, one after another;
    // the threads' own requests waited until the stream stopped.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..24)
        .map(|_| {
            let (sock, ns_path, done) = (sock.clone(), bed.a.path(), done.clone());
            std::thread::spawn(move || {
                tapir_sys::netns::enter(&ns_path).unwrap();
                let until = Instant::now() + Duration::from_secs(6);
                while Instant::now() < until {
                    if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&sock) {
                        let _ = s.write_all(b"get=1\n\n");
                        let _ = std::io::Read::read_to_end(&mut s, &mut Vec::new());
                    }
                }
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let show = sh(bed.a.cmd("wg").args(["show", &a.name, "dump"]));
    assert!(
        !done.load(std::sync::atomic::Ordering::SeqCst),
        "wg show answered only once the stream of clients stopped"
    );
    assert!(show.contains(&pb), "{show}");
    for c in clients {
        c.join().unwrap();
    }
}

#[test]
fn a_running_tunnel_keeps_the_network_capabilities_alone_and_still_works() {
    require_root!();
    let bed = bed("caps");
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let (a, b) = tapir_sides(&bed, ifname("tpc"), ifname("tpd"));
    let mut ta = tapir(&bed, &a, &ka, &pb, Some("10.200.0.2:51820"), "10.77.0.2/32");
    let _tb = tapir(&bed, &b, &kb, &pa, Some("10.200.0.1:51820"), "10.77.0.1/32");
    ping(&bed.a, "10.77.0.2");
    let pid = ta.0.as_ref().unwrap().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap()
    };
    // Bits 12 and 10: CAP_NET_ADMIN and CAP_NET_BIND_SERVICE, and nothing
    // else, in every set; no way back.
    for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(field(set), "0000000000001400", "{set} of {pid}: {status}");
    }
    assert_eq!(field("NoNewPrivs:"), "1");
    // wg set still changes the tunnel, and traffic still flows.
    let extra = genkey().1;
    sh(bed.a.cmd("wg").args([
        "set",
        &a.name,
        "peer",
        &extra,
        "allowed-ips",
        "10.77.0.9/32",
    ]));
    let show = sh(bed.a.cmd("wg").args(["show", &a.name, "allowed-ips"]));
    assert!(show.contains("10.77.0.9/32"), "{show}");
    // What CAP_NET_ADMIN is kept for: marking the socket (wg-quick's
    // default routes) is refused without it.
    sh(bed.a.cmd("wg").args(["set", &a.name, "fwmark", "0x1234"]));
    let mark = sh(bed.a.cmd("wg").args(["show", &a.name, "fwmark"]));
    assert_eq!(mark.trim(), "0x1234");
    // And CAP_NET_BIND_SERVICE for a port under 1024, which root's WireGuard
    // takes (it was "Permission denied"); the peer follows the move.
    sh(bed.a.cmd("wg").args(["set", &a.name, "listen-port", "443"]));
    let port = sh(bed.a.cmd("wg").args(["show", &a.name, "listen-port"]));
    assert_eq!(port.trim(), "443");
    ping(&bed.a, "10.77.0.2");
    // And shutdown still cleans up.
    ta.stop();
    assert!(!bed.a.has_link(&a.name), "the device is gone");
    assert!(
        !std::path::Path::new(&format!("/var/run/wireguard/{}.sock", a.name)).exists(),
        "the control socket is gone"
    );
}

/// `User = 65534`: after setup the tunnel runs as that user with
/// CAP_NET_ADMIN and CAP_NET_BIND_SERVICE alone; traffic, `wg set` (a port
/// under 1024 too) and down still work.
#[test]
fn a_tunnel_runs_as_its_user_with_the_network_capabilities_only() {
    require_root!();
    let bed = bed("usr");
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let b = Side {
        ns: &bed.b,
        name: ifname("usb"),
        port: 51898,
        addr: "10.77.0.2",
    };
    let _tb = tapir(&bed, &b, &kb, &pa, None, "10.77.0.1/32");
    let name = ifname("usa");
    let file = write_private(
        &bed,
        &format!("{name}.conf"),
        &format!(
            "[Interface]\nPrivateKey = {ka}\nAddress = 10.77.0.1/24\nUser = 65534\n\n\
             [Peer]\nPublicKey = {pb}\nEndpoint = 10.200.0.2:51898\nAllowedIPs = 10.77.0.2/32\n"
        ),
    );
    let run = |args: &[&str]| {
        let out = bed
            .a
            .cmd(env!("CARGO_BIN_EXE_tapir"))
            .args(args)
            .env("TAPIR_RUN_DIR", bed.dir.join("run"))
            .env("TAPIR_LOG_DIR", bed.dir.join("log"))
            .output()
            .unwrap();
        ok(&out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["up", file.to_str().unwrap()]);
    let st: serde_json::Value = serde_json::from_str(&run(&["status", &name, "--json"])).unwrap();
    let pid = st[0]["pid"].as_i64().unwrap();
    let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        proc_status
            .lines()
            .find(|l| l.starts_with(k))
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(field("Uid:"), "65534 65534 65534 65534", "{proc_status}");
    assert_eq!(
        field("CapEff:"),
        "0000000000001400",
        "the network's two alone"
    );
    assert_eq!(field("CapPrm:"), "0000000000001400");
    assert_eq!(field("CapBnd:"), "0000000000001400", "nothing to gain back");
    assert_eq!(field("NoNewPrivs:"), "1");
    ping(&bed.a, "10.77.0.2");
    // wg set still reaches it.
    let (_, other) = genkey();
    let out = bed
        .a
        .cmd("wg")
        .args(["set", &name, "peer", &other, "allowed-ips", "10.77.0.50/32"])
        .output()
        .unwrap();
    ok(&out);
    let shown = bed
        .a
        .cmd("wg")
        .args(["show", &name, "peers"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&shown.stdout).contains(&other));
    // A port under 1024, as that user.
    ok(&bed
        .a
        .cmd("wg")
        .args(["set", &name, "listen-port", "853"])
        .output()
        .unwrap());
    let port = bed
        .a
        .cmd("wg")
        .args(["show", &name, "listen-port"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&port.stdout).trim(), "853");
    run(&["down", &name]);
    assert!(!bed.a.has_link(&name), "the device went");
    let sockets = Command::new("find")
        .args(["/var/run/wireguard", "-name", &format!("{name}.sock")])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&sockets.stdout).trim().is_empty(),
        "down cleared the control socket the user could not remove"
    );
}

/// An idle tunnel sleeps until there is work: no thread wakes on a fixed
/// tick (the signal watcher, the control thread and the parked outbound
/// thread used to, 19 wake-ups a second in all); only the timer wheel's
/// one-second look remains. A signal, a `wg` request and traffic still
/// wake it at once.
#[test]
fn an_idle_tunnel_sleeps_until_there_is_work() {
    require_root!();
    let bed = bed("idle");
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let (a, b) = tapir_sides(&bed, ifname("tpi"), ifname("tpj"));
    let mut ta = tapir(&bed, &a, &ka, &pb, Some("10.200.0.2:51820"), "10.77.0.2/32");
    let _tb = tapir(&bed, &b, &kb, &pa, Some("10.200.0.1:51820"), "10.77.0.1/32");
    ping(&bed.a, "10.77.0.2");
    let pid = ta.0.as_ref().unwrap().id();
    // Voluntary context switches of its threads (all, or those named
    // `only`): each is a sleep that ended.
    let wakes = |only: Option<&str>| -> u64 {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("status")).ok())
            .filter(|s| only.is_none_or(|n| s.lines().any(|l| l == format!("Name:\t{n}"))))
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                    .map(|v| v.trim().parse::<u64>().unwrap())
                    .collect::<Vec<_>>()
            })
            .sum()
    };
    // The timers look once more after the ping, then sleep until the
    // next one is due (a keepalive 10 s after the reply, here).
    std::thread::sleep(Duration::from_millis(1500));
    let (before, watcher_before) = (wakes(None), wakes(Some("tapir-host")));
    std::thread::sleep(Duration::from_secs(4));
    let idle = wakes(None) - before;
    assert!(
        idle <= 3,
        "{idle} wake-ups in 4 s of an idle tunnel (the timers woke once a second; now they sleep until one is due)"
    );
    // The host's watcher sleeps until the kernel says something changed
    // (it looked once a second).
    let watcher = wakes(Some("tapir-host")) - watcher_before;
    assert!(watcher <= 1, "the host watcher woke {watcher} times in 4 s");
    // Still awake to what matters: a request, traffic, a reload, shutdown.
    let show = sh(bed.a.cmd("wg").args(["show", &a.name, "peers"]));
    assert!(show.contains(&pb), "{show}");
    ping(&bed.a, "10.77.0.2");
    let started = Instant::now();
    let err = ta.stop();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "SIGTERM took {:?}: {err}",
        started.elapsed()
    );
    assert!(err.contains("down"), "{err}");
    assert!(!bed.a.has_link(&a.name), "the device is gone");
}

/// The timers of an idle tunnel sleep until their next deadline, where
/// they looked once a second: a handshake that nobody answers is still
/// retried on time, 5 s (and up to a third of a second) apart, though no
/// packet, request or news wakes the tunnel meanwhile.
#[test]
fn an_idle_tunnel_retries_an_unanswered_handshake_on_time() {
    require_root!();
    let bed = bed("retry");
    let ((ka, _), (_, pb)) = (genkey(), genkey());
    let (a, _) = tapir_sides(&bed, ifname("tpr"), ifname("tps"));
    // The peer's address takes the initiations and answers none.
    let silent = bed.b.run(|| UdpSocket::bind("10.200.0.2:51820").unwrap());
    silent
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let _ta = tapir(&bed, &a, &ka, &pb, Some("10.200.0.2:51820"), "10.77.0.2/32");
    // The first at start (a restarted tunnel handshakes at once), then
    // the retries.
    let started = Instant::now();
    let mut at = Vec::new();
    let mut buf = [0u8; 2048];
    while started.elapsed() < Duration::from_millis(11_600) && at.len() < 3 {
        if let Ok((n, _)) = silent.recv_from(&mut buf) {
            assert_eq!((n, buf[0]), (148, 1), "an initiation");
            at.push(Instant::now());
        }
    }
    assert_eq!(at.len(), 3, "initiations in 11.6 s: {at:?}");
    for w in at.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(4_900) && gap < Duration::from_millis(5_800),
            "retried {gap:?} after the last (5 s and up to 333 ms of jitter)"
        );
    }
}

/// A host with two addresses answers from the one it was written to, as
/// the kernel's WireGuard does ("sticky sockets"): behind a stateful
/// firewall (or NAT) that lets in only replies to what went out, a peer
/// that writes to the second address and gets answers from the first is
/// cut off (8 of 8 pings lost).
#[test]
fn answers_leave_from_the_address_the_peer_wrote_to() {
    require_root!();
    let bed = bed("sticky");
    bed.b.ip(&["addr", "add", "10.200.0.22/24", "dev", "vb"]);
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let (a, b) = tapir_sides(&bed, ifname("tsa"), ifname("tsb"));
    // a's side: UDP from b only as a reply to what a sent (conntrack).
    nft(
        &bed.a,
        "table inet fw {\n chain in {\n  type filter hook input priority 0;\n  udp sport 51820 ct state established accept\n  udp sport 51820 counter drop\n }\n}\n",
    );
    let _tb = tapir(&bed, &b, &kb, &pa, None, "10.77.0.1/32");
    let _ta = tapir(
        &bed,
        &a,
        &ka,
        &pb,
        Some("10.200.0.22:51820"),
        "10.77.0.2/32",
    );
    ping(&bed.a, "10.77.0.2");
    let dropped = sh(bed.a.cmd("nft").args(["list", "table", "inet", "fw"]));
    assert!(dropped.contains("counter packets 0 "), "{dropped}");
    // The address goes: answers leave from where the kernel chooses, and
    // once a writes to that one, the tunnel goes on.
    bed.b.ip(&["addr", "del", "10.200.0.22/24", "dev", "vb"]);
    let out = bed
        .a
        .cmd("wg")
        .args(["set", &a.name, "peer", &pb, "endpoint", "10.200.0.2:51820"])
        .output()
        .unwrap();
    ok(&out);
    ping(&bed.a, "10.77.0.2");
    ping(&bed.b, "10.77.0.1");
}

/// A datagram the kernel refuses (here a firewall's drop on output: EPERM)
/// never left: `wg show`'s transfer leaves it out, as the kernel's
/// WireGuard counts only what it sent.
#[test]
fn what_the_kernel_refuses_to_send_is_not_counted_as_sent() {
    require_root!();
    let bed = bed("refused");
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let (a, b) = tapir_sides(&bed, ifname("tra"), ifname("trb"));
    let _tb = tapir(&bed, &b, &kb, &pa, None, "10.77.0.1/32");
    let _ta = tapir(&bed, &a, &ka, &pb, Some("10.200.0.2:51820"), "10.77.0.2/32");
    ping(&bed.a, "10.77.0.2");
    let sent = || {
        let out = sh(bed.a.cmd("wg").args(["show", &a.name, "transfer"]));
        let tx = out.split_whitespace().nth(2).map(str::parse::<u64>);
        tx.and_then(Result::ok).unwrap_or_else(|| panic!("{out}"))
    };
    let before = sent();
    nft(
        &bed.a,
        "table inet out { chain out { type filter hook output priority 0; udp dport 51820 drop; }; }",
    );
    let lost = bed
        .a
        .cmd("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "1", "10.77.0.2"])
        .output()
        .unwrap();
    assert!(!lost.status.success(), "the firewall let the pings through");
    assert_eq!(sent(), before, "refused datagrams counted as sent");
    nft(&bed.a, "delete table inet out");
    ping(&bed.a, "10.77.0.2");
    assert!(sent() > before);
}

/// How many times `needle` is in the memory of process `pid` that is its
/// own (its heap, its stacks, its anonymous mappings: not the files it maps).
fn copies_in_memory(pid: u32, needle: &[u8]) -> usize {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut copies = 0;
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let file_backed = f.get(5).is_some_and(|n| n.starts_with('/'));
        if !f[1].starts_with('r') || file_backed || line.contains("[v") {
            continue;
        }
        let (a, b) = f[0].split_once('-').unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut data = vec![0; (b - a) as usize];
        if mem.seek(SeekFrom::Start(a)).is_err() || mem.read_exact(&mut data).is_err() {
            continue;
        }
        copies += data.windows(needle.len()).filter(|w| *w == needle).count();
    }
    copies
}

/// The private key is where it is kept (the configuration, the tunnel, the
/// control socket's answer), each zeroized on drop, and nowhere else: no
/// copy left behind in a stack frame by the moves of what holds it, or by
/// the handshakes that use it (there were 41 in a running tunnel).
#[test]
fn a_running_tunnel_holds_its_private_key_in_a_few_places_only() {
    require_root!();
    let bed = bed("pkcopies");
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let (a, b) = tapir_sides(&bed, ifname("tka"), ifname("tkb"));
    let _tb = tapir(&bed, &b, &kb, &pa, None, "10.77.0.1/32");
    let ta = tapir(&bed, &a, &ka, &pb, Some("10.200.0.2:51820"), "10.77.0.2/32");
    ping(&bed.a, "10.77.0.2");
    sh(bed.a.cmd("wg").args(["show", &a.name]));
    let hex = tapir_proto::wg::keys::PrivateKey::from_base64(&ka)
        .unwrap()
        .to_hex();
    let key: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let pid = ta.0.as_ref().unwrap().id();
    let copies = copies_in_memory(pid, &key);
    eprintln!("{copies} copies of the private key");
    assert!(
        copies <= 6,
        "{copies} copies of the private key in the process"
    );
}

/// Namespaces joined through router `r` (forwarding, no reverse-path
/// filter): `links` are (namespace, its device, the router's device), and
/// `addrs` (namespace, CIDR, device) and `defaults` (namespace, gateway)
/// what each gets.
fn routed(
    lab: &netlab::Lab,
    r: &netlab::Netns,
    links: &[(&netlab::Netns, &str, &str)],
    addrs: &[(&netlab::Netns, &str, &str)],
    defaults: &[(&netlab::Netns, &str)],
) {
    for (ns, dev, rdev) in links {
        lab.veth(ns, dev, r, rdev);
    }
    for (ns, addr, dev) in addrs {
        ns.ip(&["addr", "add", addr, "dev", dev]);
    }
    for (ns, via) in defaults {
        ns.ip(&["route", "add", "default", "via", via]);
    }
    for k in ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0"] {
        assert!(r.cmd("sysctl").args(["-qw", k]).status().unwrap().success());
    }
}

/// A tapir server on `server` (port 51830, 10.77.0.2) and a client on
/// `client` (10.77.0.1) that writes to it at `endpoint` (`extra` in its
/// [Peer]), both running; and the directory of their files.
fn server_and_client(
    server: &netlab::Netns,
    client: &netlab::Netns,
    endpoint: &str,
    extra: &str,
) -> (Proc, Proc, std::path::PathBuf) {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "wg-sc-{}-{}",
        client.name(),
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let ((ks, ps), (kc, pc)) = (genkey(), genkey());
    let (ns_, nc) = (ifname("tsv"), ifname("tcl"));
    let fs = support::write_private(
        &dir,
        &format!("{ns_}.conf"),
        &format!(
            "[Interface]\nPrivateKey = {ks}\nListenPort = 51830\nAddress = 10.77.0.2/24\n\n[Peer]\nPublicKey = {pc}\nAllowedIPs = 10.77.0.1/32\n"
        ),
    );
    let fc = support::write_private(
        &dir,
        &format!("{nc}.conf"),
        &format!(
            "[Interface]\nPrivateKey = {kc}\nAddress = 10.77.0.1/24\n\n[Peer]\nPublicKey = {ps}\nEndpoint = {endpoint}\nAllowedIPs = 10.77.0.2/32\n{extra}"
        ),
    );
    let s = run_tapir(server, &fs, &ns_);
    let c = run_tapir(client, &fc, &nc);
    (s, c, dir)
}

/// Where the way back to the peer leaves by another interface than the
/// one its datagram came in on, answers take the kernel's choice, as the
/// kernel's WireGuard does (from the address it wrote to, but pinned to
/// that interface, the kernel took the peer for on-link there and asked
/// ARP for it: no handshake ever completed).
#[test]
fn answers_take_the_way_back_the_routes_give() {
    require_root!();
    let lab = netlab::Lab::new();
    let (c, r, s) = (lab.netns("c"), lab.netns("r"), lab.netns("s"));
    routed(
        &lab,
        &r,
        &[(&s, "s1", "r1"), (&s, "s2", "r2"), (&c, "c3", "r3")],
        &[
            (&s, "10.7.1.1/24", "s1"),
            (&s, "10.7.2.1/24", "s2"),
            (&r, "10.7.1.254/24", "r1"),
            (&r, "10.7.2.254/24", "r2"),
            (&r, "10.7.3.254/24", "r3"),
            (&c, "10.7.3.10/24", "c3"),
        ],
        &[(&s, "10.7.2.254"), (&c, "10.7.3.254")],
    );
    let (_s, _c, dir) = server_and_client(&s, &c, "10.7.1.1:51830", "");
    ping(&c, "10.77.0.2");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A host with two uplinks whose default route moves to the other (the
/// first one's way gone): its answers stop leaving from the first one's
/// address once a handshake goes unanswered, as the kernel's WireGuard
/// drops its source then (it never got through again).
#[test]
fn a_host_whose_route_moves_to_its_other_uplink_gets_through_again() {
    require_root!();
    let lab = netlab::Lab::new();
    let (a, r, b) = (lab.netns("a"), lab.netns("r"), lab.netns("b"));
    routed(
        &lab,
        &r,
        &[(&a, "e0", "r0"), (&a, "e1", "r1"), (&b, "eb", "rb")],
        &[
            (&a, "10.1.1.2/24", "e0"),
            (&a, "10.1.3.2/24", "e1"),
            (&r, "10.1.1.1/24", "r0"),
            (&r, "10.1.3.1/24", "r1"),
            (&r, "10.1.2.1/24", "rb"),
            (&b, "10.1.2.2/24", "eb"),
        ],
        &[(&a, "10.1.1.1"), (&b, "10.1.2.1")],
    );
    let (_b, _a, dir) = server_and_client(&b, &a, "10.1.2.2:51830", "PersistentKeepalive = 2\n");
    // Both ways, so that each side has heard the other (a from b at 10.1.1.2).
    ping(&a, "10.77.0.2");
    ping(&b, "10.77.0.1");
    // The default route moves to e1, and e0's way is gone.
    a.ip(&["route", "replace", "default", "via", "10.1.3.1"]);
    r.ip(&["link", "set", "r0", "down"]);
    let took = first_reply(&a, "10.77.0.2", Duration::from_secs(40));
    assert!(took < Duration::from_secs(30), "{took:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A hundred thousand allowed IPs moved from one peer to another by one
/// request: applied in well under the control socket's two seconds (each
/// prefix was looked for in lists, quadratically: 5 s), and said to have
/// succeeded, as it did (a slow one was applied yet answered "timed out").
#[test]
fn a_hundred_thousand_allowed_ips_move_in_one_request() {
    require_root!();
    let bed = bed("bigset");
    let (ka, _) = genkey();
    let ((_, p1), (_, p2)) = (genkey(), genkey());
    let name = ifname("tbs");
    let _tp = peerless(&bed, &name, &ka);
    let many: Vec<String> = (0..100_000u32)
        .map(|i| {
            format!(
                "10.{}.{}.{}/32",
                100 + i / 62_500,
                (i / 250) % 250,
                1 + i % 250
            )
        })
        .collect();
    let list = many.join(",");
    let set = |peer: &str| {
        let file = write_private(
            &bed,
            "big.conf",
            &format!("[Peer]\nPublicKey = {peer}\nAllowedIPs = {list}\n"),
        );
        let out = bed
            .a
            .cmd("wg")
            .args(["addconf", &name, file.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "wg addconf: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    set(&p1);
    set(&p2);
    let shown = sh(bed.a.cmd("wg").args(["show", &name, "allowed-ips"]));
    for line in shown.lines() {
        let n = line.split_whitespace().count() - 1;
        if line.starts_with(&p2) {
            assert_eq!(n, 100_000, "the second peer has them all");
        } else {
            assert!(line.contains("(none)"), "the first kept some: {n}");
        }
    }
}

/// With net.ipv6.bindv6only=1 (a host's choice), the tunnel's one socket
/// still takes IPv4 too, as wireguard-go's two do (it took IPv6 alone, and
/// every IPv4 peer's datagrams were refused).
#[test]
fn ipv4_peers_get_through_where_sockets_default_to_ipv6_only() {
    require_root!();
    let bed = bed("v6only");
    for ns in [&bed.a, &bed.b] {
        sh(ns.cmd("sysctl").args(["-qw", "net.ipv6.bindv6only=1"]));
    }
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let (a, b) = tapir_sides(&bed, ifname("t6a"), ifname("t6b"));
    let _tb = tapir(&bed, &b, &kb, &pa, None, "10.77.0.1/32");
    let _ta = tapir(&bed, &a, &ka, &pb, Some("10.200.0.2:51820"), "10.77.0.2/32");
    ping(&bed.a, "10.77.0.2");
    ping(&bed.b, "10.77.0.1");
}

/// A tunnel with one peer reaches it by a socket connected to its endpoint
/// (see the tunnel's `connected` module): on at both ends; no other program
/// can bind the port beside it; it follows the peer when it roams (whose
/// datagrams then come to the tunnel's own socket, out of the wait while
/// the connected one is on); it goes off with a second peer and on again
/// without it, and pings go through all along.
#[test]
fn a_lone_peer_is_reached_by_a_connected_socket_that_follows_it() {
    require_root!();
    let bed = bed("conn");
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    // (Names of their own: wg finds a tunnel's socket by its name alone.)
    let (a, b) = tapir_sides(&bed, ifname("tcna"), ifname("tcnb"));
    // (b listens first: a's first handshake is not lost to it.)
    let tb = tapir(&bed, &b, &kb, &pa, None, "10.77.0.1/32");
    let ta = tapir(&bed, &a, &ka, &pb, Some("10.200.0.2:51820"), "10.77.0.2/32");
    ping(&bed.a, "10.77.0.2");
    let counter = |ns: &netlab::Netns, t: &Proc, which: &str| {
        let name = if std::ptr::eq(ns, &bed.a) {
            &a.name
        } else {
            &b.name
        };
        status_json(ns, &bed.dir, name, t)["counters"][which]
            .as_u64()
            .unwrap_or(u64::MAX)
    };
    wait_for(
        || counter(&bed.a, &ta, "udp_connected") == 1 && counter(&bed.b, &tb, "udp_connected") == 1,
        "a connected socket at each end",
    );
    // SO_REUSEPORT served the bind alone: the port is the tunnel's (its
    // own address too, which the connected socket took at connect).
    let port_held = || {
        for addr in ["[::]:51820", "0.0.0.0:51820", "10.200.0.2:51820"] {
            let refused = bed.b.run(|| {
                let addr: std::net::SocketAddr = addr.parse().unwrap();
                let s = socket2::Socket::new(
                    socket2::Domain::for_address(addr),
                    socket2::Type::DGRAM,
                    None,
                )
                .unwrap();
                s.set_reuse_port(true).unwrap();
                s.bind(&addr.into()).map_err(|e| e.kind())
            });
            assert_eq!(
                refused.err(),
                Some(std::io::ErrorKind::AddrInUse),
                "a bind to {addr} beside the tunnel"
            );
        }
    };
    port_held();
    let connects_b = counter(&bed.b, &tb, "udp_connects");
    // a roams (a new port): b hears it on its own socket, answers, and
    // connects to where it now is.
    sh(bed
        .a
        .cmd("wg")
        .args(["set", &a.name, "listen-port", "40123"]));
    ping(&bed.a, "10.77.0.2");
    wait_for(
        || {
            let e = sh(bed.b.cmd("wg").args(["show", &b.name, "endpoints"]));
            e.contains("10.200.0.1:40123")
                && counter(&bed.b, &tb, "udp_connects") > connects_b
                && counter(&bed.b, &tb, "udp_connected") == 1
        },
        "b connected to a's new port",
    );
    ping(&bed.a, "10.77.0.2");
    ping(&bed.b, "10.77.0.1");
    // (Made again beside the old one: still the tunnel's alone.)
    port_held();
    // A second peer: off, and the pings go by the tunnel's own socket.
    let (_, pc) = genkey();
    sh(bed
        .b
        .cmd("wg")
        .args(["set", &b.name, "peer", &pc, "allowed-ips", "10.77.0.9/32"]));
    wait_for(
        || counter(&bed.b, &tb, "udp_connected") == 0,
        "off with two peers",
    );
    ping(&bed.a, "10.77.0.2");
    ping(&bed.b, "10.77.0.1");
    sh(bed
        .b
        .cmd("wg")
        .args(["set", &b.name, "peer", &pc, "remove"]));
    wait_for(
        || counter(&bed.b, &tb, "udp_connected") == 1,
        "on again with one",
    );
    ping(&bed.a, "10.77.0.2");
    // a's address moves: with two, answers must leave from where each
    // came to (off); with the new one alone, on again, from there.
    // (Promoted when the first goes, not taken with it.)
    sh(bed
        .a
        .cmd("sysctl")
        .args(["-qw", "net.ipv4.conf.va.promote_secondaries=1"]));
    bed.a.ip(&["addr", "add", "10.200.0.11/24", "dev", "va"]);
    wait_for(
        || counter(&bed.a, &ta, "udp_connected") == 0,
        "off with two addresses",
    );
    ping(&bed.a, "10.77.0.2");
    bed.a.ip(&["addr", "del", "10.200.0.1/24", "dev", "va"]);
    wait_for(
        || counter(&bed.a, &ta, "udp_connected") == 1,
        "on again with one",
    );
    ping(&bed.a, "10.77.0.2");
    let e = sh(bed.b.cmd("wg").args(["show", &b.name, "endpoints"]));
    assert!(
        e.contains("10.200.0.11:40123"),
        "a's datagrams come from its new address: {e}"
    );
    for (ns, t, name) in [(&bed.a, &ta, &a.name), (&bed.b, &tb, &b.name)] {
        let st = status_json(ns, &bed.dir, name, t);
        // (Each made at once: the new one binds beside the old.)
        assert_eq!(st["counters"]["udp_connect_failures"], 0, "{st}");
        assert_eq!(st["counters"]["udp_refused"], 0, "{st}");
    }
}
