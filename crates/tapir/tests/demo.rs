//! `tapir demo`: runs, prints a ping result and a throughput figure, and
//! leaves no namespace behind, also when interrupted half-way.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use netlab::require_root;

const TAPIR: &str = env!("CARGO_BIN_EXE_tapir");

fn leftovers(pid: u32) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("tapir-demo-{pid}-")))
                .collect()
        })
        .unwrap_or_default()
}

/// `tapir demo --seconds 1 FLAGS`, which must succeed with an unbroken
/// ping; its output and its pid (for the leftover check).
fn run_demo(flags: &[&str]) -> (String, u32) {
    let child = Command::new(TAPIR)
        .args(["demo", "--seconds", "1"])
        .args(flags)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{flags:?}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(" 0% packet loss"), "{stdout}");
    (stdout, pid)
}

#[test]
fn the_demo_runs_and_leaves_nothing_behind() {
    require_root!();
    let (stdout, pid) = run_demo(&[]);
    assert!(
        stdout.contains("bits/sec") && stdout.contains("receiver"),
        "{stdout}"
    );
    assert!(
        stdout.contains("$ ip netns add tapir-demo-")
            && stdout.contains("by hand: wg genkey")
            && stdout.contains("by hand, each tapir run does what these do: ip tuntap add"),
        "shows the commands: {stdout}"
    );
    assert!(
        !stdout.contains("PrivateKey = ") || stdout.contains("PrivateKey = ..."),
        "no key printed"
    );
    assert!(leftovers(pid).is_empty(), "{:?}", leftovers(pid));
}

#[test]
fn the_demo_runs_over_tcp_in_tap_mode_too() {
    require_root!();
    for flags in [&["--tcp"][..], &["--tap"][..], &["--tcp", "--tap"][..]] {
        let (stdout, pid) = run_demo(flags);
        if flags.contains(&"--tcp") {
            assert!(
                stdout.contains("Transport = tcp") && stdout.contains("over TCP"),
                "{stdout}"
            );
        }
        if flags.contains(&"--tap") {
            assert!(stdout.contains("Mode = tap"), "{stdout}");
        }
        assert!(leftovers(pid).is_empty(), "{:?}", leftovers(pid));
    }
}

#[test]
fn without_ping_and_iperf3_the_demo_uses_its_own() {
    require_root!();
    // A PATH holding only ip.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("demo-path-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap();
    let _ = std::fs::remove_file(dir.join("ip"));
    std::os::unix::fs::symlink(ip, dir.join("ip")).unwrap();
    let child = Command::new(TAPIR)
        .args(["demo", "--seconds", "1"])
        .env("PATH", &dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("3 echoes, round trips"), "{stdout}");
    assert!(stdout.contains("Gbit/s from A to B"), "{stdout}");
    assert!(leftovers(pid).is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        // pid (comm) state ppid ...: the comm may hold spaces, not ')'.
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
}

/// A demo started, and read until its throughput step runs (the tunnel
/// processes and iperf3 or its own bulk transfer with it).
fn demo_in_step_5() -> (
    std::process::Child,
    u32,
    std::io::Lines<BufReader<std::process::ChildStdout>>,
) {
    let mut child = Command::new(TAPIR)
        .args(["demo", "--seconds", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    for line in lines.by_ref() {
        if line.unwrap().starts_with("==> 5.") {
            break;
        }
        assert!(Instant::now() < deadline, "the demo never reached step 5");
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !leftovers(pid).is_empty(),
        "the namespaces exist while it runs"
    );
    (child, pid, lines)
}

/// Ctrl-C, `kill`, and a closed terminal (SIGHUP) each end the demo within
/// a moment, in the middle of its measurement too, with 128 + the signal,
/// and leave nothing: namespaces, tunnel processes.
#[test]
fn an_interrupted_demo_still_cleans_up() {
    require_root!();
    for (sig, code) in [("INT", 130), ("TERM", 143), ("HUP", 129)] {
        let (mut child, pid, lines) = demo_in_step_5();
        let helpers = children_of(pid);
        assert!(helpers.len() >= 2, "{helpers:?}");
        let t = Instant::now();
        Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .unwrap();
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let status = child.wait().unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(8),
            "SIG{sig}: ended after {:?}",
            t.elapsed()
        );
        assert_eq!(status.code(), Some(code), "SIG{sig}");
        assert!(rest.iter().any(|l| l.contains("cleaned up")), "{rest:?}");
        assert!(leftovers(pid).is_empty(), "SIG{sig}: {:?}", leftovers(pid));
        assert!(
            !helpers.iter().any(|&h| alive(h)),
            "SIG{sig}: {helpers:?} left"
        );
    }
}

/// Killed outright, the demo cannot clean up, but its tunnel processes end
/// with it (they would run on, under init, holding its namespaces).
#[test]
fn a_killed_demo_takes_its_tunnel_processes_with_it() {
    require_root!();
    let (mut child, pid, _lines) = demo_in_step_5();
    let helpers = children_of(pid);
    assert!(helpers.len() >= 2, "{helpers:?}");
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while helpers.iter().any(|&h| alive(h)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<u32> = helpers.iter().copied().filter(|&h| alive(h)).collect();
    for ns in leftovers(pid) {
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    }
    if let Ok(d) = std::fs::read_dir(std::env::temp_dir()) {
        for e in d.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("tapir-demo-{pid}-"))
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    assert!(left.is_empty(), "still running: {left:?}");
}
