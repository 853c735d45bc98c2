//! `tapir doctor`: what the kernel and this process can do, and how to fix what is missing.
//!
//! Each check is independent and ends in `ok`, `warn` (tapir works, with less)
//! or `fail` (something tapir needs is missing); the exit status is non-zero
//! when any check fails. The offload probe creates a transient tun device in
//! the current namespace and closes it at once; nothing else is changed.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use serde::Serialize;
use tapir_sys::{IfName, Mode, Netlink, TunDevice, TunOptions, offload, tun};

use crate::caps;

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// All is well.
    Ok,
    /// tapir works, without this.
    Warn,
    /// Something tapir needs is missing.
    Fail,
}

/// One check: what, how it went, and how to fix it.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// The outcome.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do about it.
    pub fix: Option<String>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// True when no check failed.
    pub ok: bool,
    /// Every check, in order.
    pub checks: Vec<Check>,
}

fn check(
    name: &'static str,
    status: Status,
    detail: impl Into<String>,
    fix: Option<String>,
) -> Check {
    Check {
        name,
        status,
        detail: detail.into(),
        fix,
    }
}

fn tun_driver() -> Check {
    let misc = std::fs::read_to_string("/proc/misc").unwrap_or_default();
    if misc
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("tun"))
    {
        return check(
            "tun driver",
            Status::Ok,
            "registered (misc device 10:200)",
            None,
        );
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let moddir = Path::new("/lib/modules").join(release.trim());
    let dep = std::fs::read_to_string(moddir.join("modules.dep")).unwrap_or_default();
    if dep.lines().any(|l| l.contains("/tun.ko")) {
        check(
            "tun driver",
            Status::Warn,
            "available as a module, not loaded yet (opening /dev/net/tun loads it)",
            Some("modprobe tun to load it now, or list tun in /etc/modules-load.d/".into()),
        )
    } else {
        check(
            "tun driver",
            Status::Fail,
            "this kernel has no TUN/TAP driver",
            Some("use a kernel built with CONFIG_TUN=y or =m".into()),
        )
    }
}

fn clone_device(path: &Path) -> Check {
    const NAME: &str = "clone device";
    let shown = path.display();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(_) => {
            // The node is made where the driver's is, not at any path given
            // (it said `mkdir -p / && mknod /nonexistent ...`).
            let fix = if path == Path::new("/dev/net/tun") {
                "modprobe tun, or mkdir -p /dev/net && mknod /dev/net/tun c 10 200 && chmod 0666 /dev/net/tun".to_string()
            } else {
                "give --tun-path /dev/net/tun (the tun driver's clone device), or leave it out"
                    .to_string()
            };
            return check(NAME, Status::Fail, format!("{shown} is missing"), Some(fix));
        }
    };
    // Remaking the node is advice for the clone device's own place only:
    // another path given by mistake (/dev/null) is not to be removed.
    let usual = path == Path::new("/dev/net/tun");
    let remake = |what: String| {
        if usual {
            format!("rm {shown} && mknod {shown} c 10 200 && chmod 0666 {shown}")
        } else {
            format!("{what}: give --tun-path /dev/net/tun (the tun driver's clone device)")
        }
    };
    if !meta.file_type().is_char_device() {
        return check(
            NAME,
            Status::Fail,
            format!("{shown} is not a character device"),
            Some(remake(format!("{shown} is not the clone device"))),
        );
    }
    let (major, minor) = (
        (meta.rdev() >> 8) & 0xfff,
        (meta.rdev() & 0xff) | ((meta.rdev() >> 12) & 0xfff00),
    );
    if (major, minor) != (10, 200) {
        return check(
            NAME,
            Status::Fail,
            format!("{shown} is device {major}:{minor}, not the tun device 10:200"),
            Some(remake(format!("{shown} is another device"))),
        );
    }
    let mode = meta.mode() & 0o777;
    if let Err(e) = tun::open_clone_device(path) {
        return check(
            NAME,
            Status::Fail,
            format!("{shown} (mode {mode:04o}) cannot be opened: {e}"),
            None,
        );
    }
    if mode & 0o006 == 0o006 {
        check(
            NAME,
            Status::Ok,
            format!("{shown}: character device 10:200, mode {mode:04o}: any user may open it"),
            None,
        )
    } else {
        check(
            NAME,
            Status::Warn,
            format!(
                "{shown}: character device 10:200, mode {mode:04o}: only root can open it, so users cannot use devices given to them with --user"
            ),
            Some(format!(
                "chmod 0666 {shown} (the mode most distributions ship; the kernel still checks device ownership)"
            )),
        )
    }
}

fn capabilities() -> Check {
    let root = nix::unistd::geteuid().is_root();
    match caps::effective() {
        Some(c) if c & (1 << caps::CAP_NET_ADMIN) != 0 => match tapir_sys::netns::caps_count_here() {
            Some(false) => check(
                "CAP_NET_ADMIN",
                Status::Fail,
                "held in a user namespace that does not own this network namespace (unshare -U, a rootless container): the kernel refuses every change here with EPERM",
                Some("run as root of the host, or in a network namespace of this user namespace's own (unshare -Urn, or a container with its own network)".into()),
            ),
            _ => check("CAP_NET_ADMIN", Status::Ok, "held: may create devices and change links, addresses and routes", None),
        },
        // Root without it: taken away by whoever started it.
        Some(_) if root => check(
            "CAP_NET_ADMIN",
            Status::Fail,
            "not held, though root: the capability was taken away (a container without it, or a bounding set): cannot create, delete or configure devices",
            Some("give it back: docker run --cap-add NET_ADMIN, systemd AmbientCapabilities=CAP_NET_ADMIN, or start without a reduced bounding set (capsh --print shows it)".into()),
        ),
        // A user: devices root made for them are theirs to open.
        Some(_) => check(
            "CAP_NET_ADMIN",
            Status::Warn,
            "not held (not root): cannot create, delete or configure devices, but may open devices made for this user",
            Some("to create or configure: sudo; to use one without root: sudo tapir dev add NAME --user $USER, then open it as yourself".into()),
        ),
        None => check("CAP_NET_ADMIN", Status::Warn, "cannot read /proc/self/status", Some("mount /proc".into())),
    }
}

fn features(path: &Path) -> Vec<Check> {
    match tun::features(path) {
        Ok(f) => {
            let mut out = vec![if f.tun_and_tap() {
                check(
                    "tun/tap modes",
                    Status::Ok,
                    format!("tun and tap supported (features {:#06x})", f.0),
                    None,
                )
            } else {
                check(
                    "tun/tap modes",
                    Status::Fail,
                    format!("driver reports features {:#06x}", f.0),
                    None,
                )
            }];
            out.push(if f.multi_queue() {
                check(
                    "multi-queue",
                    Status::Ok,
                    "supported (one queue per worker)",
                    None,
                )
            } else {
                check(
                    "multi-queue",
                    Status::Warn,
                    "not supported: one queue only",
                    Some("use Linux 3.8 or later".into()),
                )
            });
            out.push(if f.vnet_hdr() {
                check("vnet header", Status::Ok, "supported", None)
            } else {
                check(
                    "vnet header",
                    Status::Warn,
                    "not supported: no offloads",
                    None,
                )
            });
            out
        }
        Err(e) => vec![check(
            "tun/tap modes",
            Status::Fail,
            format!("cannot ask the driver: {e}"),
            None,
        )],
    }
}

fn offloads(path: &Path) -> Check {
    const NAME: &str = "offloads";
    if !caps::has_net_admin() || tapir_sys::netns::caps_count_here() == Some(false) {
        return check(
            NAME,
            Status::Warn,
            "not probed: needs CAP_NET_ADMIN here to create a test device",
            Some(
                "run tapir doctor with CAP_NET_ADMIN in this namespace (see CAP_NET_ADMIN above)"
                    .into(),
            ),
        );
    }
    let options = TunOptions {
        vnet_hdr: true,
        ..TunOptions::new(Mode::Tun)
    };
    let name = IfName::new("tapirprobe%d").expect("constant name");
    let dev = match TunDevice::create(path, &name, options) {
        Ok(d) => d,
        Err(e) => {
            return check(
                NAME,
                Status::Warn,
                format!("could not create a test device: {e}"),
                None,
            );
        }
    };
    let tso = offload::CSUM | offload::TSO4 | offload::TSO6;
    if dev.set_offload(tso).is_err() {
        return check(
            NAME,
            Status::Warn,
            "TSO not accepted: one packet per read",
            None,
        );
    }
    if dev.set_offload(tso | offload::USO4 | offload::USO6).is_ok() {
        check(
            NAME,
            Status::Ok,
            "checksum, TSO4/6 and USO4/6 offloads available",
            None,
        )
    } else {
        check(
            NAME,
            Status::Ok,
            "checksum and TSO4/6 available; no USO (UDP segmentation needs Linux 6.2)",
            None,
        )
    }
}

fn netlink() -> Check {
    match Netlink::open().and_then(|mut nl| nl.links()) {
        Ok(links) => check(
            "netlink",
            Status::Ok,
            format!(
                "rtnetlink answers ({} link{} in this namespace)",
                links.len(),
                if links.len() == 1 { "" } else { "s" }
            ),
            None,
        ),
        Err(e) => check(
            "netlink",
            Status::Fail,
            format!("rtnetlink does not answer: {e}"),
            None,
        ),
    }
}

fn namespaces() -> Check {
    if Path::new("/proc/self/ns/net").exists() {
        check(
            "network namespaces",
            Status::Ok,
            "supported (tapir demo and the tests use them)",
            None,
        )
    } else {
        check(
            "network namespaces",
            Status::Warn,
            "not supported: tapir demo and the tests cannot run",
            Some("use a kernel with CONFIG_NET_NS=y".into()),
        )
    }
}

/// Runs every check.
pub fn run(tun_path: &Path) -> Report {
    let mut checks = vec![tun_driver(), clone_device(tun_path), capabilities()];
    checks.extend(features(tun_path));
    checks.push(offloads(tun_path));
    checks.push(netlink());
    checks.push(namespaces());
    Report {
        ok: checks.iter().all(|c| c.status != Status::Fail),
        checks,
    }
}

/// The report for a terminal.
pub fn format(report: &Report) -> String {
    let width = report
        .checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for c in &report.checks {
        let word = match c.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        out += &format!("{word}  {:<width$}  {}\n", c.name, c.detail);
        if let Some(fix) = &c.fix {
            out += &format!("      {:<width$}  fix: {fix}\n", "");
        }
    }
    let warned = report.checks.iter().any(|c| c.status == Status::Warn);
    out += if report.ok && warned {
        "everything tapir needs is here, within the warnings above\n"
    } else if report.ok {
        "everything tapir needs is here\n"
    } else {
        "something tapir needs is missing: see FAIL above\n"
    };
    out
}
