//! `tapir echo` and `tapir dump` against the kernel's own ping and tcpdump,
//! in throw-away network namespaces.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use netlab::{Lab, Netns, require_root};

const TAPIR: &str = env!("CARGO_BIN_EXE_tapir");

/// A tapir process we started; ended by its pid on drop if still running.
struct Running(Option<Child>);

impl Running {
    fn start(ns: &Netns, args: &[&str]) -> Self {
        let child = ns
            .cmd(TAPIR)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tapir");
        Self(Some(child))
    }

    /// Sends SIGTERM and collects the output.
    fn stop(mut self) -> Output {
        let child = self.0.take().unwrap();
        let st = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        child.wait_with_output().unwrap()
    }

    fn wait(mut self) -> Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits (bounded) until `dev` is up, has carrier (a reader) and `addr`.
/// tapir run as user and group 65534 (nobody), without capabilities.
fn as_nobody(ns: &Netns) -> Command {
    let mut c = ns.cmd("setpriv");
    c.args([
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        TAPIR,
    ]);
    c
}

fn wait_ready(ns: &Netns, dev: &str, addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if ns.has_link(dev) {
            let a = ns.ip_json(&["addr", "show", "dev", dev]);
            let flags = a[0]["flags"].to_string();
            if flags.contains("LOWER_UP") && a.to_string().contains(addr) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{dev} never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ping(ns: &Netns, args: &[&str]) -> String {
    let out = ns.cmd("ping").args(args).output().expect("run ping");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ping {args:?}: {text}");
    assert!(text.contains(" 0% packet loss"), "ping {args:?}: {text}");
    assert!(
        !text.contains("wrong data byte") && !text.contains("DUP!"),
        "ping {args:?}: {text}"
    );
    text
}

fn lab_ns(lab: &Lab) -> Netns {
    let ns = lab.netns("echo");
    // Quiet devices: no router solicitations or MLD reports in the counts.
    ns.cmd("sysctl")
        .args(["-qw", "net.ipv6.conf.default.router_solicitations=0"])
        .status()
        .unwrap();
    ns
}

fn tcpdump_lines(file: &std::path::Path) -> Vec<String> {
    let out = Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(file)
        .output()
        .expect("tcpdump -r");
    assert!(
        out.status.success(),
        "tcpdump -r: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

fn temp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("tapir-{}-{name}", std::process::id()))
}

#[test]
fn tun_echo_answers_ping_and_ping6_of_every_size() {
    require_root!();
    let lab = Lab::new();
    let ns = lab_ns(&lab);
    let pcap = temp("tun-echo.pcap");
    let echo = Running::start(
        &ns,
        &[
            "echo",
            "tun0",
            "--mode",
            "tun",
            "--addr",
            "10.9.0.1/24",
            "--addr",
            "fd09::1/64",
            "--pcap",
            pcap.to_str().unwrap(),
        ],
    );
    wait_ready(&ns, "tun0", "fd09::1");
    let mut sent = 0;
    for size in ["0", "56", "1400", "1472"] {
        ping(&ns, &["-c", "5", "-i", "0.01", "-s", size, "10.9.0.2"]);
        sent += 5;
    }
    for size in ["0", "56", "1400", "1452"] {
        ping(
            &ns,
            &["-6", "-c", "5", "-i", "0.01", "-s", size, "fd09::77"],
        );
        sent += 5;
    }
    // Any routed address answers, not just one.
    ping(&ns, &["-c", "1", "10.9.0.254"]);
    sent += 1;
    // The capture is whole while echo runs (it was written at exit only).
    assert_eq!(tcpdump_lines(&pcap).len(), 2 * sent, "before the end");
    // Not the subnet's broadcast address: a reply would come from it.
    let out = ns
        .cmd("ping")
        .args(["-b", "-c", "1", "-W", "1", "10.9.0.255"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a reply from the broadcast address");
    let out = echo.stop();
    // (The counters go to stderr: stdout may be the capture.)
    let stdout = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("{sent} echo replies")), "{stdout}");
    assert!(!ns.has_link("tun0"), "the device it created is gone");

    let lines = tcpdump_lines(&pcap);
    let requests = lines.iter().filter(|l| l.contains("echo request")).count();
    let replies = lines.iter().filter(|l| l.contains("echo reply")).count();
    // (The broadcast's request, unanswered, is there too.)
    assert_eq!((requests, replies), (sent + 1, sent), "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("IP 10.9.0.2 > 10.9.0.1: ICMP echo reply")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("IP6 fd09::77 > fd09::1: ICMP6, echo reply")),
        "{lines:#?}"
    );
    std::fs::remove_file(pcap).unwrap();
}

#[test]
fn tap_echo_answers_arp_neighbour_discovery_and_ping() {
    require_root!();
    let lab = Lab::new();
    let ns = lab_ns(&lab);
    let pcap = temp("tap-echo.pcap");
    let echo = Running::start(
        &ns,
        &[
            "echo",
            "tap0",
            "--mode",
            "tap",
            "--addr",
            "10.9.0.1/24",
            "--addr",
            "fd09::1/64",
            "--mac",
            "02:00:00:00:00:09",
            "--pcap",
            pcap.to_str().unwrap(),
        ],
    );
    wait_ready(&ns, "tap0", "fd09::1");
    for size in ["0", "56", "1400", "1472"] {
        ping(&ns, &["-c", "5", "-i", "0.01", "-s", size, "10.9.0.2"]);
    }
    for size in ["0", "56", "1400", "1452"] {
        ping(&ns, &["-6", "-c", "5", "-i", "0.01", "-s", size, "fd09::2"]);
    }
    // The kernel learned our MAC through ARP and neighbour discovery.
    let neigh = ns.ip(&["neigh", "show", "dev", "tap0"]);
    assert!(
        neigh.contains("10.9.0.2 lladdr 02:00:00:00:00:09"),
        "{neigh}"
    );
    assert!(
        neigh.contains("fd09::2 lladdr 02:00:00:00:00:09"),
        "{neigh}"
    );
    // An address the host takes while echo runs passes its duplicate
    // address detection (echo defended it: "dadfailed"), and is the
    // host's from then on.
    ns.ip(&["addr", "add", "fd09::20/64", "dev", "tap0"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let a = ns.ip(&["-6", "addr", "show", "dev", "tap0"]);
        assert!(!a.contains("dadfailed"), "{a}");
        if a.contains("fd09::20/64") && !a.contains("tentative") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{a}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = echo.stop();
    // (The counters go to stderr: stdout may be the capture.)
    let stdout = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("40 echo replies"), "{stdout}");
    assert!(
        !stdout.contains(" 0 ARP replies") && !stdout.contains(" 0 neighbour advertisements"),
        "{stdout}"
    );
    assert!(!ns.has_link("tap0"));

    let lines = tcpdump_lines(&pcap);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("ARP, Reply 10.9.0.2 is-at 02:00:00:00:00:09")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("neighbor advertisement, tgt is fd09::2")),
        "{lines:#?}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.contains("echo reply")).count(),
        40
    );
    std::fs::remove_file(pcap).unwrap();
}

#[test]
fn a_flood_loses_nothing_and_the_counters_match() {
    require_root!();
    let lab = Lab::new();
    let ns = lab_ns(&lab);
    let echo = Running::start(&ns, &["echo", "tun0", "--addr", "10.9.0.1/24"]);
    wait_ready(&ns, "tun0", "10.9.0.1");
    // Bounded: 20000 packets, at most 60 seconds.
    let text = ping(&ns, &["-f", "-c", "20000", "-w", "60", "10.9.0.2"]);
    assert!(
        text.contains("20000 packets transmitted, 20000 received"),
        "{text}"
    );
    let out = echo.stop();
    // (The counters go to stderr: stdout may be the capture.)
    let stdout = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("20000 echo replies"), "{stdout}");
    assert!(stdout.contains("0 write errors"), "{stdout}");
}

#[test]
fn echo_on_an_existing_device_takes_back_only_what_it_added() {
    require_root!();
    let lab = Lab::new();
    let ns = lab_ns(&lab);
    let ok = |args: &[&str]| {
        let out = ns.cmd(TAPIR).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(&["dev", "add", "tun5", "--mode", "tun"]);
    ok(&["dev", "set", "tun5", "--addr", "10.5.0.1/24"]);
    let echo = Running::start(
        &ns,
        &[
            "echo",
            "tun5",
            "--addr",
            "10.5.0.1/24",
            "--addr",
            "10.6.0.1/24",
            "--only",
            "10.6.0.7",
        ],
    );
    wait_ready(&ns, "tun5", "10.6.0.1");
    ping(&ns, &["-c", "2", "-i", "0.05", "10.6.0.7"]);
    // --only: another address gets nothing.
    let miss = ns
        .cmd("ping")
        .args(["-c", "1", "-W", "1", "10.6.0.8"])
        .output()
        .unwrap();
    assert!(!miss.status.success());
    let out = echo.stop();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ignored: 1 not for us,"));
    assert!(ns.has_link("tun5"), "a device that existed stays");
    let addrs = ns.ip(&["-4", "addr", "show", "dev", "tun5"]);
    assert!(
        addrs.contains("10.5.0.1/24") && !addrs.contains("10.6.0.1"),
        "{addrs}"
    );
    let link = ns.ip(&["link", "show", "dev", "tun5"]);
    assert!(!link.contains(",UP"), "brought down again: {link}");
    // The address there with another prefix (a peer's /32, left by an
    // earlier experiment): not added, and said, where it was silent.
    ns.ip(&["addr", "flush", "dev", "tun5"]);
    ns.ip(&["addr", "add", "10.5.0.1", "peer", "10.5.0.2", "dev", "tun5"]);
    let echo = Running::start(&ns, &["echo", "tun5", "--addr", "10.5.0.1/24"]);
    wait_ready(&ns, "tun5", "10.5.0.1");
    let out = echo.stop();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: --addr 10.5.0.1/24 not added: tun5 has 10.5.0.1/32 peer 10.5.0.2"),
        "{err}"
    );
}

#[test]
fn echo_refuses_a_device_of_another_mode_or_kind() {
    require_root!();
    let lab = Lab::new();
    let ns = lab_ns(&lab);
    ns.cmd(TAPIR)
        .args(["dev", "add", "tap3", "--mode", "tap"])
        .output()
        .unwrap();
    let out = ns
        .cmd(TAPIR)
        .args(["echo", "tap3", "--mode", "tun"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tap3 is a tap device, not tun"), "{err}");
    let out = ns.cmd(TAPIR).args(["echo", "lo"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not tun/tap"));
    // An --only address that can never be answered: refused, nothing left.
    for (only, why) in [
        ("10.4.0.255", "network or broadcast"),
        ("10.4.0.1", "own address"),
        ("192.168.1.1", "outside the tap's subnets"),
    ] {
        let out = ns
            .cmd(TAPIR)
            .args([
                "echo",
                "tap4",
                "--mode",
                "tap",
                "--addr",
                "10.4.0.1/24",
                "--only",
                only,
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(why), "{only}: {err}");
        assert!(!ns.has_link("tap4"), "the device it made went");
    }
    // --mac on a tun: refused (it was taken and ignored), nothing left.
    let out = ns
        .cmd(TAPIR)
        .args([
            "echo",
            "tun4",
            "--mode",
            "tun",
            "--mac",
            "02:00:00:00:00:01",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--mac is for tap mode"),
        "{err}"
    );
    assert!(!ns.has_link("tun4"));
    // On a tun, an --only address no route sends there: said (it was
    // silently never answered).
    let echo = Running(Some(
        ns.cmd(TAPIR)
            .args([
                "echo",
                "tun5",
                "--mode",
                "tun",
                "--addr",
                "10.5.0.1/24",
                "--only",
                "192.168.5.5",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    wait_ready(&ns, "tun5", "10.5.0.1");
    let out = echo.stop();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: --only 192.168.5.5: no route sends it to tun5"),
        "{err}"
    );
    // Not "physical", and the way to watch it.
    let out = ns.cmd(TAPIR).args(["dump", "lo"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("lo is a loopback") && err.contains("tcpdump -i lo"),
        "{err}"
    );
}

/// A device `d0` (`mode`, `extra` flags) up at 10.7.0.1/24 in a fresh
/// namespace, and `tapir dump d0 --count 2 --write WRITE` run there (in
/// `dir`) while three pings go out unanswered: its output.
fn dump_two(lab: &Lab, mode: &str, extra: &[&str], write: &str, dir: &std::path::Path) -> Output {
    let ns = lab_ns(lab);
    let run = |args: &[&str]| {
        let out = ns.cmd(TAPIR).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[&["dev", "add", "d0", "--mode", mode][..], extra].concat());
    ns.cmd("sysctl")
        .args(["-qw", "net.ipv6.conf.d0.disable_ipv6=1"])
        .status()
        .unwrap();
    run(&["dev", "set", "d0", "--up", "--addr", "10.7.0.1/24"]);
    let dump = Running(Some(
        ns.cmd(TAPIR)
            .args(["dump", "d0", "--count", "2", "--write", write])
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tapir"),
    ));
    wait_ready(&ns, "d0", "10.7.0.1");
    // Nobody answers: the requests (or the ARP queries) are what the dump sees.
    let _ = ns
        .cmd("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "1", "10.7.0.2"])
        .output()
        .unwrap();
    let out = dump.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ns.has_link("d0"), "a device that existed stays");
    out
}

fn dump_case(mode: &str, extra: &[&str], expect: &str, tcpdump_expect: &str) {
    let lab = Lab::new();
    let pcap = temp(&format!("dump-{mode}-{}.pcap", extra.len()));
    let out = dump_two(
        &lab,
        mode,
        extra,
        pcap.to_str().unwrap(),
        &std::env::temp_dir(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines.iter().all(|l| l.contains(expect)), "{stdout}");
    let recorded = tcpdump_lines(&pcap);
    assert_eq!(recorded.len(), 2, "{recorded:#?}");
    assert!(
        recorded.iter().all(|l| l.contains(tcpdump_expect)),
        "{recorded:#?}"
    );
    std::fs::remove_file(pcap).unwrap();
}

/// `--write -`: the pcap on standard output and no lines, as tcpdump's
/// `-w -` (for `| tcpdump -r -`); a file named `-` is not made.
#[test]
fn dump_writes_pcap_to_standard_output() {
    require_root!();
    let lab = Lab::new();
    let dir = temp("dump-stdout");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dump_two(&lab, "tun", &[], "-", &dir);
    assert!(!dir.join("-").exists(), "a file named -");
    let pcap = dir.join("out.pcap");
    std::fs::write(&pcap, &out.stdout).unwrap();
    let recorded = tcpdump_lines(&pcap);
    assert_eq!(recorded.len(), 2, "{recorded:#?}");
    assert!(
        recorded
            .iter()
            .all(|l| l.contains("IP 10.7.0.1 > 10.7.0.2: ICMP echo request")),
        "{recorded:#?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn dump_tun_prints_and_records() {
    require_root!();
    dump_case(
        "tun",
        &[],
        "IP 10.7.0.1 > 10.7.0.2: ICMP echo request, id",
        "IP 10.7.0.1 > 10.7.0.2: ICMP echo request",
    );
}

#[test]
fn dump_tap_prints_and_records() {
    require_root!();
    dump_case(
        "tap",
        &[],
        "ARP, Request who-has 10.7.0.2 tell 10.7.0.1",
        "ARP, Request who-has 10.7.0.2 tell 10.7.0.1",
    );
}

#[test]
fn dump_understands_packet_info_and_vnet_headers() {
    require_root!();
    dump_case(
        "tun",
        &["--pi"],
        "ICMP echo request",
        "IP 10.7.0.1 > 10.7.0.2: ICMP echo request",
    );
    dump_case(
        "tap",
        &["--pi", "--vnet-hdr"],
        "ARP, Request who-has 10.7.0.2",
        "ARP, Request who-has 10.7.0.2",
    );
}

#[test]
fn dump_creates_a_transient_device_and_refuses_a_busy_one() {
    require_root!();
    let lab = Lab::new();
    let ns = lab_ns(&lab);
    let dump = Running::start(&ns, &["dump", "t9", "--mode", "tap"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ns.has_link("t9") {
        assert!(Instant::now() < deadline, "t9 never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = ns.cmd(TAPIR).args(["dump", "t9"]).output().unwrap();
    assert!(!second.status.success());
    // Its holder named (it said "another program").
    let holder = format!("already open in tapir({})", dump.0.as_ref().unwrap().id());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains(&holder), "{err}");
    let out = dump.stop();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("0 packets captured"));
    assert!(
        !ns.has_link("t9"),
        "a transient device goes away with its reader"
    );
    // A multi-queue device in use: not joined as one more queue, which
    // would take the holder's packets.
    assert!(
        ns.cmd(TAPIR)
            .args(["dev", "add", "mq9", "--mode", "tun", "--multi-queue"])
            .status()
            .unwrap()
            .success()
    );
    let holder = Running::start(&ns, &["echo", "mq9", "--addr", "10.62.0.1/24"]);
    wait_ready(&ns, "mq9", "10.62.0.1");
    let second = ns
        .cmd(TAPIR)
        .args(["dump", "mq9", "--count", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success() && err.contains("tcpdump -i mq9"),
        "{err}"
    );
    ping(&ns, &["-c", "3", "-i", "0.05", "10.62.0.5"]);
    assert!(holder.stop().status.success());
}

/// A user answers pings on a device of their own, made for them by root,
/// up and with its address: without CAP_NET_ADMIN, nothing needs changing.
#[test]
fn echo_runs_as_the_devices_owner_without_the_capability() {
    require_root!();
    let lab = Lab::new();
    let ns = lab_ns(&lab);
    let dir = temp("echo-user");
    std::fs::create_dir_all(&dir).unwrap();
    // A clone device users may open (mode 0666, as many distributions ship it).
    let node = dir.join("tun");
    assert!(
        Command::new("mknod")
            .args([node.to_str().unwrap(), "c", "10", "200"])
            .status()
            .unwrap()
            .success()
    );
    Command::new("chmod")
        .args(["0666", node.to_str().unwrap()])
        .status()
        .unwrap();
    for args in [
        &["dev", "add", "utun0", "--mode", "tun", "--user", "65534"][..],
        &["dev", "set", "utun0", "--up", "--addr", "10.88.1.1/24"],
    ] {
        assert!(ns.cmd(TAPIR).args(args).status().unwrap().success());
    }
    let echo = Running(Some(
        as_nobody(&ns)
            .args(["echo", "utun0", "--tun-path", node.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    wait_ready(&ns, "utun0", "10.88.1.1");
    ping(&ns, &["-c", "2", "-i", "0.1", "10.88.1.2"]);
    let out = echo.stop();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A device given to nobody in particular is open to any user, as the
    // kernel has it (tapir refused: "belongs to user none and group none").
    for args in [
        &["dev", "add", "otun0", "--mode", "tun"][..],
        &["dev", "set", "otun0", "--up", "--addr", "10.88.2.1/24"],
    ] {
        assert!(ns.cmd(TAPIR).args(args).status().unwrap().success());
    }
    let echo = Running(Some(
        as_nobody(&ns)
            .args(["echo", "otun0", "--tun-path", node.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    wait_ready(&ns, "otun0", "10.88.2.1");
    ping(&ns, &["-c", "2", "-i", "0.1", "10.88.2.2"]);
    let out = echo.stop();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What the user cannot open is named for what it is: a device that is
    // not there, or one that is someone else's (both were "creating a
    // device, or opening one that belongs to another user").
    assert!(
        ns.cmd(TAPIR)
            .args(["dev", "add", "rtun0", "--mode", "tun", "--user", "0"])
            .status()
            .unwrap()
            .success()
    );
    // Its owner, but not in its group: the kernel wants both.
    assert!(
        ns.cmd(TAPIR)
            .args([
                "dev", "add", "gtun0", "--mode", "tun", "--user", "65534", "--group", "0"
            ])
            .status()
            .unwrap()
            .success()
    );
    for (dev, want) in [
        ("nosuch0", "there is no device nosuch0"),
        ("rtun0", "rtun0 belongs to user 0"),
        ("gtun0", "gtun0 belongs to user 65534 and group 0"),
    ] {
        let out = as_nobody(&ns)
            .args([
                "dump",
                dev,
                "--count",
                "1",
                "--tun-path",
                node.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
