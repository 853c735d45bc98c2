//! Throw-away network labs for tests: namespaces, veth pairs and bridges that
//! disappear when the [`Lab`] is dropped, also when the test panics.
//!
//! ```text
//!   Lab ──owns──▶ Netns "tapir-t<pid>-<n>-a" ◀─veth─▶ Netns "tapir-t<pid>-<n>-b"
//!    │               ├─ cmd("ping")   : ip netns exec NAME ping ...
//!    │               ├─ run(|| ...)   : a closure on a thread moved into the namespace
//!    │               └─ ip_json(..)   : what iproute2 sees, as JSON
//!    └─ drop: kills what it spawned, deletes every namespace (and all devices in them)
//! ```
//!
//! Nothing here touches the root namespace: every device is created inside a
//! lab namespace, and deleting a namespace deletes its devices. Names carry
//! the test process's pid, so namespaces left by a killed test run are found
//! and removed by the next [`Lab::new`].

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

const PREFIX: &str = "tapir-t";
const NETNS_DIR: &str = "/run/netns";

/// Whether this process runs as root (network namespaces need it).
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Returns early from a test that needs root, with a one-line reason, and
/// records the skip (see [`note_skip`]) so the suite's summary counts it as
/// skipped, never as passed.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            $crate::note_skip(module_path!(), line!());
            eprintln!("skipped: needs root (creates network namespaces and tun devices)");
            return;
        }
    };
}

/// Appends `module:line` to the file named by `NETLAB_SKIP_LOG`, if set:
/// the test harness has no "skipped" outcome, so `scripts/test.sh` counts
/// skips from this file (and fails if there are any when run as root).
pub fn note_skip(module: &str, line: u32) {
    use std::io::Write;
    if let Some(path) = std::env::var_os("NETLAB_SKIP_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{module}:{line}");
        }
    }
}

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// A set of network namespaces (and processes in them) owned by one test.
pub struct Lab {
    prefix: String,
    namespaces: Mutex<Vec<String>>,
    children: Mutex<Vec<Child>>,
}

/// A handle on one namespace of a [`Lab`]; cheap to clone, valid while the lab lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netns {
    name: String,
}

fn run_checked(cmd: &mut Command) -> io::Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("{cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        )));
    }
    Ok(out)
}

impl Lab {
    /// A new, empty lab. Removes namespaces left behind by dead test processes.
    pub fn new() -> Self {
        sweep_stale();
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        Self {
            prefix: format!("{PREFIX}{}-{n}", std::process::id()),
            namespaces: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
        }
    }

    /// Creates namespace `short` of this lab, with its loopback up and IPv6
    /// duplicate-address detection off (so addresses are usable at once).
    pub fn netns(&self, short: &str) -> Netns {
        let name = format!("{}-{short}", self.prefix);
        run_checked(Command::new("ip").args(["netns", "add", &name]))
            .unwrap_or_else(|e| panic!("netlab: cannot create namespace {name}: {e}"));
        self.namespaces.lock().unwrap().push(name.clone());
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        for key in [
            "net.ipv6.conf.all.accept_dad",
            "net.ipv6.conf.default.accept_dad",
        ] {
            let _ = ns.cmd("sysctl").args(["-qw", &format!("{key}=0")]).output();
        }
        ns
    }

    /// Joins `a`'s interface `a_if` and `b`'s interface `b_if` with a veth pair, both up.
    pub fn veth(&self, a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
        a.ip(&[
            "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
        ]);
        a.ip(&["link", "set", a_if, "up"]);
        b.ip(&["link", "set", b_if, "up"]);
    }

    /// Creates bridge `name` in `ns` with `ports` (interfaces already in `ns`), up.
    pub fn bridge(&self, ns: &Netns, name: &str, ports: &[&str]) {
        ns.ip(&["link", "add", name, "type", "bridge"]);
        for port in ports {
            ns.ip(&["link", "set", port, "master", name]);
        }
        ns.ip(&["link", "set", name, "up"]);
    }

    /// Starts `cmd` and keeps it: the lab kills it (by its pid) when dropped.
    /// Returns the pid.
    pub fn spawn(&self, cmd: &mut Command) -> u32 {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("netlab: cannot start {cmd:?}: {e}"));
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        pid
    }

    /// The names of this lab's namespaces.
    pub fn namespace_names(&self) -> Vec<String> {
        self.namespaces.lock().unwrap().clone()
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let children =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(|e| e.into_inner()));
        for mut child in children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let names = std::mem::take(&mut *self.namespaces.lock().unwrap_or_else(|e| e.into_inner()));
        for name in names.iter().rev() {
            delete_netns(name);
        }
    }
}

fn delete_netns(name: &str) {
    // Processes still inside would keep the namespace alive; `ip netns pids`
    // lists them, and only processes in a lab namespace are ours to end.
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
    // What tunnels killed in it left: their control sockets, in tapir's
    // directory for this namespace (named by its inode). Removed while the
    // namespace still exists, so its inode is not yet another's.
    if let Ok(meta) = std::fs::metadata(Path::new(NETNS_DIR).join(name)) {
        let _ = std::fs::remove_dir_all(format!("/var/run/wireguard/netns-{}", meta.ino()));
    }
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
}

/// Deletes `tapir-t<pid>-...` namespaces whose test process no longer exists.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            delete_netns(&name);
        }
    }
}

impl Netns {
    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its path, for `setns` or `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// A command that will run `program` inside this namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs `ip ARGS` in this namespace; panics with iproute2's message if it fails.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = run_checked(Command::new("ip").args(["-n", &self.name]).args(args))
            .unwrap_or_else(|e| panic!("netlab: {e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `ip -d -j ARGS` in this namespace and parses the JSON.
    pub fn ip_json(&self, args: &[&str]) -> serde_json::Value {
        let out = run_checked(
            Command::new("ip")
                .args(["-d", "-j", "-n", &self.name])
                .args(args),
        )
        .unwrap_or_else(|e| panic!("netlab: {e}"));
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return serde_json::Value::Array(vec![]);
        }
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("netlab: ip -j {args:?}: bad JSON: {e}"))
    }

    /// Runs `f` on a new thread that has moved into this namespace, and
    /// returns its result. A panic in `f` is re-raised here.
    pub fn run<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(move || {
                tapir_sys::netns::enter(&path)
                    .unwrap_or_else(|e| panic!("netlab: cannot enter namespace: {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|payload| std::panic::resume_unwind(payload))
        })
    }

    /// Whether interface `name` exists in this namespace.
    pub fn has_link(&self, name: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.name, "link", "show", "dev", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_made_joined_and_removed() {
        require_root!();
        let names;
        {
            let lab = Lab::new();
            let a = lab.netns("a");
            let b = lab.netns("b");
            lab.veth(&a, "va", &b, "vb");
            a.ip(&["addr", "add", "10.77.0.1/24", "dev", "va"]);
            b.ip(&["addr", "add", "10.77.0.2/24", "dev", "vb"]);
            assert!(a.has_link("va") && b.has_link("vb"));
            assert!(!a.has_link("vb"));
            // A closure really runs inside the namespace.
            let devs = a.run(|| std::fs::read_to_string("/proc/thread-self/net/dev").unwrap());
            assert!(devs.contains("va:") && !devs.contains("vb:"), "{devs}");
            let links = b.ip_json(&["link", "show", "vb"]);
            assert_eq!(links[0]["ifname"], "vb");
            names = lab.namespace_names();
            assert!(names.iter().all(|n| Path::new(NETNS_DIR).join(n).exists()));
        }
        assert!(
            names.iter().all(|n| !Path::new(NETNS_DIR).join(n).exists()),
            "dropped lab leaves nothing"
        );
    }

    #[test]
    fn a_panicking_test_still_cleans_up() {
        require_root!();
        let names = std::sync::Mutex::new(Vec::new());
        let result = std::panic::catch_unwind(|| {
            let lab = Lab::new();
            let a = lab.netns("p");
            *names.lock().unwrap() = lab.namespace_names();
            a.run(|| panic!("inside the namespace"));
        });
        assert!(result.is_err());
        let names = names.into_inner().unwrap();
        assert_eq!(names.len(), 1);
        assert!(!Path::new(NETNS_DIR).join(&names[0]).exists());
    }
}
