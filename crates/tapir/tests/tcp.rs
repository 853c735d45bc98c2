//! The TCP transport in network namespaces: interop with stock WireGuard
//! through an independent relay with udp2tcp's framing, tapir to tapir with
//! UDP blocked (tun and tap), reconnects, hostile connections, rate limits.
//!
//! ```text
//!   ns a: va 10.200.0.1 ── veth ── vb 10.200.0.2 :ns b
//!         tunnel 10.77.0.1  ═══ TCP 443 ═══  tunnel 10.77.0.2
//! ```

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use netlab::{Netns, require_root};

mod support;
use support::*;

fn relay_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/udp-over-tcp.py")
}

/// The relay fixture in `ns`, ended by pid on drop.
fn relay(ns: &Netns, args: &[&str]) -> Proc {
    let child = ns
        .cmd("python3")
        .arg(relay_script())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 runs the relay fixture");
    std::thread::sleep(Duration::from_millis(300));
    Proc(Some(child))
}

/// A wg-quick file for a TCP tunnel.
fn conf(
    bed: &Bed,
    name: &str,
    private: &str,
    iface: &str,
    peer: &str,
    peer_extra: &str,
) -> PathBuf {
    let text = format!(
        "[Interface]\nPrivateKey = {private}\nTransport = tcp\n{iface}\n\n[Peer]\nPublicKey = {peer}\n{peer_extra}\n"
    );
    write_private(&bed.dir, &format!("{name}.conf"), &text)
}

const BLOCK_UDP: &str = "table inet block {
    chain out { type filter hook output priority 0; meta l4proto udp drop; }
    chain in { type filter hook input priority 0; meta l4proto udp drop; }
}
";

#[test]
fn wireguard_go_behind_udp2tcp_reaches_a_tapir_tcp_listener() {
    require_root!();
    let bed = bed("u2t");
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let name_a = ifname("tcl");
    let file = conf(
        &bed,
        &name_a,
        &ka,
        "ListenPort = 443\nAddress = 10.77.0.1/24",
        &pb,
        "AllowedIPs = 10.77.0.2/32",
    );
    let _tp = run_tapir(&bed.a, &file, &name_a);
    // Stock WireGuard sends UDP to the relay on its own loopback.
    let _relay = relay(
        &bed.b,
        &[
            "udp2tcp",
            "--udp-listen",
            "127.0.0.1:51990",
            "--tcp-forward",
            "10.200.0.1:443",
        ],
    );
    let b = Side {
        ns: &bed.b,
        name: ifname("wgu"),
        port: 51821,
        addr: "10.77.0.2",
    };
    let _wg = wireguard_go(&bed, &b, &kb, &pa, Some("127.0.0.1:51990"), "10.77.0.1/32");
    ping(&bed.b, "10.77.0.1");
    ping(&bed.a, "10.77.0.2");
}

#[test]
fn a_tapir_tcp_client_reaches_wireguard_go_behind_tcp2udp() {
    require_root!();
    let bed = bed("t2u");
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let b = Side {
        ns: &bed.b,
        name: ifname("wgt"),
        port: 51821,
        addr: "10.77.0.2",
    };
    let _wg = wireguard_go(&bed, &b, &kb, &pa, None, "10.77.0.1/32");
    let _relay = relay(
        &bed.b,
        &[
            "tcp2udp",
            "--tcp-listen",
            "0.0.0.0:443",
            "--udp-forward",
            "127.0.0.1:51821",
        ],
    );
    let name_a = ifname("tcc");
    let file = conf(
        &bed,
        &name_a,
        &ka,
        "Address = 10.77.0.1/24",
        &pb,
        "Endpoint = 10.200.0.2:443\nAllowedIPs = 10.77.0.2/32",
    );
    let _tp = run_tapir(&bed.a, &file, &name_a);
    ping(&bed.a, "10.77.0.2");
    ping(&bed.b, "10.77.0.1");
}

/// tapir to tapir over TCP port 443 with all UDP dropped in both namespaces.
fn tapir_pair(bed: &Bed, tag: &str, mode: &str) -> (Proc, Proc, String, String) {
    tapir_pair_to(bed, tag, mode, "10.200.0.2:443")
}

/// [`tapir_pair`] with the client connecting to `endpoint` (the server's port 443).
fn tapir_pair_to(bed: &Bed, tag: &str, mode: &str, endpoint: &str) -> (Proc, Proc, String, String) {
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    // Control sockets share one directory: names unique across tests.
    let (na, nb) = (ifname(&format!("{tag}a")), ifname(&format!("{tag}b")));
    let allowed = |a: &str| {
        if mode == "tap" {
            String::new()
        } else {
            format!("AllowedIPs = {a}/32")
        }
    };
    let fa = conf(
        bed,
        &na,
        &ka,
        &format!("Mode = {mode}\nAddress = 10.77.0.1/24"),
        &pb,
        &format!("Endpoint = {endpoint}\n{}", allowed("10.77.0.2")),
    );
    let fb = conf(
        bed,
        &nb,
        &kb,
        &format!("Mode = {mode}\nListenPort = 443\nAddress = 10.77.0.2/24"),
        &pa,
        &allowed("10.77.0.1"),
    );
    let tb = run_tapir(&bed.b, &fb, &nb);
    let ta = run_tapir(&bed.a, &fa, &na);
    (ta, tb, na, nb)
}

#[test]
fn tapir_to_tapir_over_tcp_with_udp_blocked_tun_and_tap() {
    require_root!();
    for mode in ["tun", "tap"] {
        let bed = bed(&format!("blk{mode}"));
        nft(&bed.a, BLOCK_UDP);
        nft(&bed.b, BLOCK_UDP);
        let (ta, _tb, na, _) = tapir_pair(&bed, &format!("k{mode}"), mode);
        ping(&bed.a, "10.77.0.2");
        ping(&bed.b, "10.77.0.1");
        transfer(&bed.a, &bed.b, "10.77.0.2:5001", 100 << 20);
        transfer(&bed.b, &bed.a, "10.77.0.1:5001", 20 << 20);
        let text = status_text(&bed.a, &bed.dir, &na, &ta);
        assert!(
            text.contains("transport: tcp") && text.contains("connection: connected"),
            "{text}"
        );
    }
}

#[test]
fn a_reset_connection_and_a_restarted_server_recover_within_5_s() {
    require_root!();
    let bed = bed("rst");
    let (ta, tb, na, nb) = tapir_pair(&bed, "rs", "tun");
    ping(&bed.a, "10.77.0.2");
    // The server's side resets the connection once (the next segment the
    // client sends is answered with RST), then the path is open again.
    nft(
        &bed.b,
        "table inet rst {\n    chain in { type filter hook input priority 0; tcp dport 443 reject with tcp reset; }\n}\n",
    );
    let _ = bed
        .a
        .cmd("ping")
        .args(["-c", "1", "-W", "1", "10.77.0.2"])
        .output();
    nft(&bed.b, "delete table inet rst");
    let took = first_reply(&bed.a, "10.77.0.2", Duration::from_secs(15));
    eprintln!("after a reset: first reply {took:?} after the path opened");
    assert!(took < Duration::from_secs(5), "resumed after {took:?}");
    let st = status_json(&bed.a, &bed.dir, &na, &ta);
    assert_eq!(st["peers"][0]["connection"], "connected", "{st}");
    assert_eq!(st["peers"][0]["connection_state"], "connected", "{st}");
    // It only connects out: no port (it said 0).
    assert!(st["listen_port"].is_null(), "{st}");
    // The server restarted: the client reconnects and handshakes again.
    let mut tb = tb;
    tb.stop();
    let file = bed.dir.join(format!("{nb}.conf"));
    let _tb = run_tapir(&bed.b, &file, &nb);
    let took = first_reply(&bed.a, "10.77.0.2", Duration::from_secs(15));
    eprintln!("after a server restart: first reply {took:?} after it was up");
    assert!(took < Duration::from_secs(5), "resumed after {took:?}");
    // The client's log tells the story, as OpenVPN's does.
    let mut ta = ta;
    let log = ta.stop();
    assert!(log.contains("connection to 10.200.0.2:443 lost"), "{log}");
    // Once each change: up at start, lost, up again, lost at the server's
    // restart, up again.
    assert_eq!(
        log.matches("connected to 10.200.0.2:443").count(),
        3,
        "{log}"
    );
}

/// The client's address changes (a new lease, a moved laptop): its
/// connection, from an address the host no longer has, is given up within
/// a second or two and dialed again from the new one, not after
/// `TCP_USER_TIMEOUT`'s 30 s of unanswered segments (UDP takes 3 s).
#[test]
fn a_client_whose_address_goes_reconnects_from_its_new_one_in_seconds() {
    require_root!();
    let bed = bed("addr");
    // The second address takes over the subnet's route when the first goes.
    let _ = bed
        .a
        .cmd("sysctl")
        .args(["-qw", "net.ipv4.conf.va.promote_secondaries=1"])
        .status();
    bed.a.ip(&["addr", "add", "10.200.0.11/24", "dev", "va"]);
    let (ta, _tb, na, _) = tapir_pair(&bed, "ad", "tun");
    ping(&bed.a, "10.77.0.2");
    bed.a.ip(&["addr", "del", "10.200.0.1/24", "dev", "va"]);
    let took = first_reply(&bed.a, "10.77.0.2", Duration::from_secs(40));
    eprintln!("after the address went: first reply {took:?}");
    assert!(took < Duration::from_secs(8), "resumed after {took:?}");
    let st = status_json(&bed.a, &bed.dir, &na, &ta);
    assert_eq!(st["peers"][0]["connection"], "connected", "{st}");
}

/// A server reached on an address on no interface (an `ip route add
/// local` range, AnyIP) keeps its connections: only an address the host
/// had and lost closes one (each was closed at the next look, and the
/// tunnel flapped).
#[test]
fn a_connection_to_an_address_on_no_interface_stays() {
    require_root!();
    let bed = bed("anyip");
    bed.b
        .ip(&["route", "add", "local", "192.168.78.0/24", "dev", "lo"]);
    bed.a
        .ip(&["route", "add", "192.168.78.0/24", "via", "10.200.0.2"]);
    let (_ta, tb, _na, nb) = tapir_pair_to(&bed, "an", "tun", "192.168.78.5:443");
    ping(&bed.a, "10.77.0.2");
    std::thread::sleep(Duration::from_millis(3500));
    ping(&bed.a, "10.77.0.2");
    let st = status_json(&bed.b, &bed.dir, &nb, &tb);
    assert_eq!(st["counters"]["tcp_accepted"], 1, "{st}");
}

#[test]
fn the_client_backs_off_while_the_server_is_away_and_says_so() {
    require_root!();
    let bed = bed("boff");
    let (ta, tb, na, _) = tapir_pair(&bed, "bo", "tun");
    ping(&bed.a, "10.77.0.2");
    let tx = |st: &serde_json::Value| st["peers"][0]["tx_bytes"].as_u64().unwrap();
    let before = tx(&status_json(&bed.a, &bed.dir, &na, &ta));
    let mut tb = tb;
    tb.stop();
    // A ping meanwhile makes a handshake that has no connection to go on:
    // not sent, so not counted as sent.
    let _ = bed
        .a
        .cmd("ping")
        .args(["-c", "1", "-W", "1", "10.77.0.2"])
        .output();
    std::thread::sleep(Duration::from_millis(1500));
    let st = status_json(&bed.a, &bed.dir, &na, &ta);
    assert_eq!(tx(&st), before, "{st}");
    let c = st["peers"][0]["connection"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        c.starts_with("reconnecting in") && c.contains("attempt") && c.contains("refused"),
        "{st}"
    );
    // And in fields, for a script (only words before).
    let p = &st["peers"][0];
    assert!(
        p["connection_state"] == "reconnecting"
            && p["connection_attempt"].as_u64().is_some_and(|n| n >= 1)
            && p["connection_retry_ms"]
                .as_u64()
                .is_some_and(|n| n <= 30_000)
            && p["connection_error"]
                .as_str()
                .is_some_and(|e| e.contains("refused")),
        "{st}"
    );
}

#[test]
fn garbage_slow_and_half_open_connections_leave_the_listener_serving() {
    require_root!();
    let bed = bed("hostile");
    let ((ka, pa), (kb, pb)) = (genkey(), genkey());
    let nb = ifname("tph");
    let fb = conf(
        &bed,
        &nb,
        &kb,
        "ListenPort = 443\nAddress = 10.77.0.2/24",
        &pa,
        "AllowedIPs = 10.77.0.1/32",
    );
    let server = run_tapir(&bed.b, &fb, &nb);
    let pid = server.0.as_ref().unwrap().id();
    let rss_before = rss_kib(pid);
    // 300 hostile connections from a: garbage, silent, and half-closed.
    let path = bed.a.path();
    let held = std::thread::spawn(move || {
        tapir_sys::netns::enter(&path).unwrap();
        let mut held = Vec::new();
        for i in 0..300 {
            let Ok(mut s) = TcpStream::connect_timeout(
                &"10.200.0.2:443".parse().unwrap(),
                Duration::from_secs(2),
            ) else {
                continue;
            };
            match i % 3 {
                0 => {
                    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: tapir\r\n\r\n");
                }
                1 => {
                    // A length that promises a big frame, then nothing.
                    let _ = s.write_all(&[0x05, 0xdc, 4, 0, 0, 0]);
                }
                _ => {
                    let _ = s.shutdown(std::net::Shutdown::Write);
                }
            }
            held.push(s);
        }
        held
    })
    .join()
    .unwrap();
    assert!(held.len() >= 290, "connected {}", held.len());
    // A legitimate peer still gets in while they are held open.
    let na = ifname("tpg");
    let fa = conf(
        &bed,
        &na,
        &ka,
        "Address = 10.77.0.1/24",
        &pb,
        "Endpoint = 10.200.0.2:443\nAllowedIPs = 10.77.0.2/32",
    );
    let _client = run_tapir(&bed.a, &fa, &na);
    ping_args(&bed.a, &["-c", "3", "-i", "0.2", "-W", "5"], "10.77.0.2");
    let rss_after = rss_kib(pid);
    eprintln!("300 hostile connections: listener RSS {rss_before} -> {rss_after} KiB");
    assert!(
        rss_after < rss_before + 8 * 1024,
        "listener RSS grew from {rss_before} to {rss_after} KiB"
    );
    // All from one address: at most 8 of them wait at once (each newer
    // one pushes that source's oldest out), the garbage that was read
    // closed its connection, and the peer got in all the same.
    let st = status_json(&bed.b, &bed.dir, &nb, &server);
    let n = |k: &str| st["counters"][k].as_u64().unwrap_or(0);
    assert!(n("tcp_accepted") >= 290, "{st}");
    assert!(n("tcp_bad_frames") >= 1, "{st}");
    // The 100 that promised a frame and sent nothing more: pushed out, or
    // among the 8 still waiting.
    assert!(
        n("tcp_pending_closed") + n("tcp_unauthenticated") >= 100,
        "{st}"
    );
    assert!(n("tcp_unauthenticated") <= 8, "{st}");
    drop(held);
}

/// iperf3 from `ns` to `server` for `secs`; received Mbit/s.
fn iperf(ns: &Netns, server: &str, reverse: bool, secs: u32) -> f64 {
    // The server may still be closing the last test ("the server is busy
    // running a test"): asked again, a few times. Any other error is said.
    for _ in 0..20 {
        let mut cmd = ns.cmd("iperf3");
        cmd.args(["-c", server, "-t", &secs.to_string(), "-J"]);
        if reverse {
            cmd.arg("-R");
        }
        let out = cmd.output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("iperf3: {}", String::from_utf8_lossy(&out.stdout)));
        if let Some(e) = v["error"].as_str() {
            assert!(e.contains("busy"), "iperf3: {e}");
            std::thread::sleep(Duration::from_millis(250));
            continue;
        }
        return v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e6;
    }
    panic!("iperf3: the server stayed busy");
}

/// One server tunnel with two peers, over UDP and over TCP: peer a limited
/// to 20 Mbit/s each way, peer c unlimited.
///
/// ```text
///   a 10.200.0.1 ── b 10.200.0.2 | 10.202.0.2 ── c 10.202.0.1
///   10.77.0.1 (Rate = 20mbit) ══ 10.77.0.2 ══ 10.77.0.3
/// ```
#[test]
fn a_rate_limited_peer_gets_its_rate_and_an_unlimited_one_more() {
    require_root!();
    for transport in ["udp", "tcp"] {
        let bed = bed(&format!("rate{transport}"));
        let c = bed.lab.netns("c");
        bed.lab.veth(&c, "vc", &bed.b, "vbc");
        c.ip(&["addr", "add", "10.202.0.1/24", "dev", "vc"]);
        bed.b.ip(&["addr", "add", "10.202.0.2/24", "dev", "vbc"]);
        let ((ka, pa), (kb, pb), (kc, pc)) = (genkey(), genkey(), genkey());
        let names = [
            ifname(&format!("r{transport}a")),
            ifname(&format!("r{transport}b")),
            ifname(&format!("r{transport}c")),
        ];
        let server = write_private(
            &bed.dir,
            &format!("{}.conf", names[1]),
            &format!(
                "[Interface]\nPrivateKey = {kb}\nTransport = {transport}\nListenPort = 443\nAddress = 10.77.0.2/24\n\n\
                 [Peer]\nPublicKey = {pa}\nAllowedIPs = 10.77.0.1/32\nRate = 20mbit\n\n\
                 [Peer]\nPublicKey = {pc}\nAllowedIPs = 10.77.0.3/32\n"
            ),
        );
        let client = |name: &str, key: &str, addr: &str, via: &str| {
            write_private(
                &bed.dir,
                &format!("{name}.conf"),
                &format!(
                    "[Interface]\nPrivateKey = {key}\nTransport = {transport}\nAddress = {addr}/24\n\n\
                     [Peer]\nPublicKey = {pb}\nEndpoint = {via}:443\nAllowedIPs = 10.77.0.2/32\n"
                ),
            )
        };
        let tb = run_tapir(&bed.b, &server, &names[1]);
        let _ta = run_tapir(
            &bed.a,
            &client(&names[0], &ka, "10.77.0.1", "10.200.0.2"),
            &names[0],
        );
        let _tc = run_tapir(
            &c,
            &client(&names[2], &kc, "10.77.0.3", "10.202.0.2"),
            &names[2],
        );
        bed.lab.spawn(
            bed.b
                .cmd("iperf3")
                .args(["-s", "-B", "10.77.0.2"])
                .stdout(Stdio::null()),
        );
        std::thread::sleep(Duration::from_millis(300));
        ping(&bed.a, "10.77.0.2");
        ping(&c, "10.77.0.2");
        let up = iperf(&bed.a, "10.77.0.2", false, 5);
        let down = iperf(&bed.a, "10.77.0.2", true, 5);
        let free = iperf(&c, "10.77.0.2", false, 3);
        eprintln!("{transport}: limited {up:.1} up, {down:.1} down; unlimited {free:.1} Mbit/s");
        assert!(
            (16.0..=21.0).contains(&up),
            "{transport}: limited, a to b: {up:.1} Mbit/s"
        );
        assert!(
            (16.0..=21.0).contains(&down),
            "{transport}: limited, b to a: {down:.1} Mbit/s"
        );
        assert!(free > 5.0 * 20.0, "{transport}: unlimited {free:.1} Mbit/s");
        let st = status_text(&bed.b, &bed.dir, &names[1], &tb);
        assert!(st.contains("rate limit: 20 mbit each way"), "{st}");
    }
}

#[test]
fn one_file_serves_udp_and_tcp_at_once() {
    require_root!();
    let bed = bed("both");
    let ((ks, ps), (ku, pu), (kt, pt)) = (genkey(), genkey(), genkey());
    let (nu, nt) = (ifname("svu"), ifname("svt"));
    // The README's recipe: two tunnels with one key, one per transport.
    let server = write_private(
        &bed.dir,
        "server.toml",
        &format!(
            "[[tunnel]]\nname = \"{nu}\"\nprivate_key = \"{ks}\"\nlisten_port = 51820\naddresses = [\"10.77.0.2/24\"]\n\
             [[tunnel.peer]]\npublic_key = \"{pu}\"\nallowed_ips = [\"10.77.0.1/32\"]\n\n\
             [[tunnel]]\nname = \"{nt}\"\nprivate_key = \"{ks}\"\ntransport = \"tcp\"\nlisten_port = 443\naddresses = [\"10.78.0.2/24\"]\n\
             [[tunnel.peer]]\npublic_key = \"{pt}\"\nallowed_ips = [\"10.78.0.1/32\"]\n"
        ),
    );
    let _s = run_tapir(&bed.b, &server, &nt);
    let (cu, ct) = (ifname("cu"), ifname("ct"));
    let client = |name: &str, key: &str, extra: &str, addr: &str, endpoint: &str, allowed: &str| {
        let f = write_private(
            &bed.dir,
            &format!("{name}.conf"),
            &format!(
                "[Interface]\nPrivateKey = {key}\n{extra}\nAddress = {addr}\n\n[Peer]\nPublicKey = {ps}\nEndpoint = {endpoint}\nAllowedIPs = {allowed}\n"
            ),
        );
        run_tapir(&bed.a, &f, name)
    };
    let _u = client(
        &cu,
        &ku,
        "",
        "10.77.0.1/24",
        "10.200.0.2:51820",
        "10.77.0.2/32",
    );
    let _t = client(
        &ct,
        &kt,
        "Transport = tcp",
        "10.78.0.1/24",
        "10.200.0.2:443",
        "10.78.0.2/32",
    );
    ping(&bed.a, "10.77.0.2");
    ping(&bed.a, "10.78.0.2");
}
