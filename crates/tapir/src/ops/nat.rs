//! `tapir nat`: forwarding and masquerade for a guest subnet, the seed's
//! `echo 1 > /proc/sys/net/ipv4/ip_forward` and iptables MASQUERADE rule,
//! done reversibly:
//!
//! ```text
//!   enable --source S --out O ─▶ table inet tapir_nat (ours alone; other tables untouched)
//!        postrouting: saddr S oifname O masquerade
//!        forward:     saddr S oifname O accept; daddr S iifname O ct state established,related accept
//!      ─▶ ip_forward (IPv6: forwarding) on, its earlier value remembered
//!   disable [--source S --out O] ─▶ those rules gone; the last one gone: the table gone, forwarding as before
//! ```
//! Rules carry a comment `tapir nat S O`, so the ruleset is the record of
//! what is enabled; only the earlier forwarding values are kept in a file
//! (`nat.forwarding` in the run directory of this network namespace).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ipnet::IpNet;
use serde::Serialize;

/// nftables table of tapir nat's rules (inet family).
pub(crate) const TABLE: &str = "tapir_nat";

/// One enabled source subnet and its way out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// The guest subnet.
    #[serde(serialize_with = "as_text")]
    pub source: IpNet,
    /// The interface towards the outside.
    pub out: String,
}

fn as_text<S: serde::Serializer>(n: &IpNet, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(n)
}

impl Entry {
    fn comment(&self) -> String {
        format!("tapir nat {} {}", self.source, self.out)
    }
}

/// What `status` shows.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Enabled subnets.
    pub entries: Vec<Entry>,
    /// `net.ipv4.ip_forward` now.
    pub ipv4_forwarding: bool,
    /// `net.ipv6.conf.all.forwarding` now.
    pub ipv6_forwarding: bool,
}

pub(crate) fn nft(script: &str) -> Result<String, String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft: {e} (install the nftables package)"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "nft refused: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The enabled entries, read from our table's rule comments.
pub fn entries() -> Result<Vec<Entry>, String> {
    let out = Command::new("nft")
        .args(["-j", "list", "table", "inet", TABLE])
        .output()
        .map_err(|e| format!("nft: {e} (install the nftables package)"))?;
    if !out.status.success() {
        return Ok(Vec::new()); // no table: nothing enabled
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("nft -j: {e}"))?;
    let mut found = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let Some(c) = item["rule"]["comment"].as_str() else {
            continue;
        };
        let mut w = c.split_whitespace();
        if let (Some("tapir"), Some("nat"), Some(src), Some(out), None) =
            (w.next(), w.next(), w.next(), w.next(), w.next())
        {
            if let Ok(source) = src.parse() {
                let e = Entry {
                    source,
                    out: out.to_owned(),
                };
                if !found.contains(&e) {
                    found.push(e);
                }
            }
        }
    }
    Ok(found)
}

fn sysctl_path(v6: bool) -> &'static str {
    if v6 {
        "/proc/sys/net/ipv6/conf/all/forwarding"
    } else {
        "/proc/sys/net/ipv4/ip_forward"
    }
}

fn forwarding(v6: bool) -> Option<String> {
    std::fs::read_to_string(sysctl_path(v6))
        .ok()
        .map(|s| s.trim().to_owned())
}

fn set_forwarding(v6: bool, value: &str) -> Result<(), String> {
    std::fs::write(sysctl_path(v6), value).map_err(|e| format!("{}: {e}", sysctl_path(v6)))
}

/// The per-interface settings directory of a family.
fn conf_dir(v6: bool) -> &'static str {
    if v6 {
        "/proc/sys/net/ipv6/conf"
    } else {
        "/proc/sys/net/ipv4/conf"
    }
}

/// Each interface's forwarding (and `default`'s, for interfaces to come):
/// the global switch writes them all, so they are remembered with it.
fn forwarding_per_interface(v6: bool) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = std::fs::read_dir(conf_dir(v6))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let v = std::fs::read_to_string(e.path().join("forwarding")).ok()?;
            (name != "all").then(|| (name, v.trim().to_owned()))
        })
        .collect();
    found.sort();
    found
}

/// Interfaces that stop taking router advertisements once IPv6 forwarding
/// is on (`accept_ra` 1), and with them their default route.
fn ra_takers() -> Vec<String> {
    forwarding_per_interface(true)
        .into_iter()
        .filter(|(name, _)| name != "default" && name != "lo")
        .filter(|(name, _)| {
            std::fs::read_to_string(format!("{}/{name}/accept_ra", conf_dir(true)))
                .is_ok_and(|v| v.trim() == "1")
        })
        .map(|(name, _)| name)
        .collect()
}

/// Where the earlier forwarding values are kept.
fn memory(run_dir: &Path) -> Result<PathBuf, String> {
    let scope = crate::scope::Scope::current()?;
    crate::uapi::ensure_private_dir(run_dir)?;
    let dir = scope.dir(run_dir);
    crate::uapi::ensure_private_dir(&dir)?;
    Ok(dir.join("nat.forwarding"))
}

/// Enables `e`; `Ok(false)` if it already was (nothing changed).
pub fn enable(e: &Entry, run_dir: &Path) -> Result<bool, String> {
    if e.out.is_empty() || e.out.contains(['"', ' ', '\\']) {
        return Err(format!("{:?} is not an interface name", e.out));
    }
    let present = entries()?;
    if present.contains(e) {
        return Ok(false);
    }
    let v6 = e.source.addr().is_ipv6();
    // The forwarding values from before tapir's first rule, once: the
    // global switch, then each interface's, which it overwrites.
    let mem = memory(run_dir)?;
    let mut remembered = std::fs::read_to_string(&mem).unwrap_or_default();
    let key = if v6 { "ipv6" } else { "ipv4" };
    if !remembered.lines().any(|l| l.starts_with(key)) {
        let now = forwarding(v6).ok_or_else(|| format!("cannot read {}", sysctl_path(v6)))?;
        remembered += &format!("{key} {now}\n");
        for (iface, value) in forwarding_per_interface(v6) {
            remembered += &format!("{key}.{iface} {value}\n");
        }
        std::fs::write(&mem, &remembered).map_err(|err| format!("{}: {err}", mem.display()))?;
    }
    if tapir_sys::Netlink::open()
        .and_then(|mut nl| nl.link(&e.out))
        .is_ok_and(|l| l.is_none())
    {
        eprintln!(
            "tapir: warning: no interface {} here (yet): the NAT applies once one of that name exists",
            e.out
        );
    }
    if v6 && forwarding(true).as_deref() != Some("1") {
        let takers = ra_takers();
        if !takers.is_empty() {
            eprintln!(
                "tapir: warning: with IPv6 forwarding on, {} stop taking router advertisements (accept_ra 1), and a default route learnt from them goes when it expires: sysctl -w net.ipv6.conf.IFACE.accept_ra=2 keeps it",
                takers.join(", ")
            );
        }
    }
    let fam = if v6 { "ip6" } else { "ip" };
    let c = e.comment();
    let (src, out) = (e.source.trunc(), &e.out);
    nft(&format!(
        "table inet {TABLE} {{\n\
         \tchain postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         \tchain forward {{ type filter hook forward priority filter; policy accept; }}\n\
         }}\n\
         add rule inet {TABLE} postrouting {fam} saddr {src} oifname \"{out}\" masquerade comment \"{c}\"\n\
         add rule inet {TABLE} forward {fam} saddr {src} oifname \"{out}\" accept comment \"{c}\"\n\
         add rule inet {TABLE} forward {fam} daddr {src} iifname \"{out}\" ct state established,related accept comment \"{c}\"\n"
    ))?;
    set_forwarding(v6, "1")?;
    Ok(true)
}

/// Disables `which` (all entries if `None`); returns those disabled.
/// With none left, the table goes and forwarding is as it was before.
pub fn disable(which: Option<&Entry>, run_dir: &Path) -> Result<Vec<Entry>, String> {
    let present = entries()?;
    let gone: Vec<Entry> = present
        .iter()
        .filter(|e| which.is_none_or(|w| w == *e))
        .cloned()
        .collect();
    let left: Vec<&Entry> = present.iter().filter(|e| !gone.contains(e)).collect();
    if !gone.is_empty() {
        if left.is_empty() {
            nft(&format!("delete table inet {TABLE}\n"))?;
        } else {
            let out = Command::new("nft")
                .args(["-a", "-j", "list", "table", "inet", TABLE])
                .output()
                .map_err(|e| e.to_string())?;
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).map_err(|e| format!("nft -j: {e}"))?;
            let mut script = String::new();
            for item in v["nftables"].as_array().into_iter().flatten() {
                let r = &item["rule"];
                let hit = r["comment"]
                    .as_str()
                    .is_some_and(|c| gone.iter().any(|g| g.comment() == c));
                if hit {
                    script += &format!(
                        "delete rule inet {TABLE} {} handle {}\n",
                        r["chain"].as_str().unwrap_or(""),
                        r["handle"]
                    );
                }
            }
            nft(&script)?;
        }
    }
    // Forwarding of a family goes back once no entry of it is left.
    let mem = memory(run_dir)?;
    let remembered = std::fs::read_to_string(&mem).unwrap_or_default();
    let mut keep = String::new();
    for line in remembered.lines() {
        let Some((key, value)) = line.split_once(' ') else {
            continue;
        };
        // `ipv4 V` (the switch), then `ipv4.IFACE V` (each interface's).
        let (family, iface) = match key.split_once('.') {
            Some((f, i)) => (f, Some(i)),
            None => (key, None),
        };
        let v6 = family == "ipv6";
        if left.iter().any(|e| e.source.addr().is_ipv6() == v6) {
            keep += &format!("{line}\n");
            continue;
        }
        match iface {
            None => set_forwarding(v6, value)?,
            // (An interface gone meanwhile: nothing to put back.)
            Some(i) if !i.contains('/') && i != ".." => {
                let _ = std::fs::write(format!("{}/{i}/forwarding", conf_dir(v6)), value);
            }
            Some(_) => {}
        }
    }
    if keep.is_empty() {
        let _ = std::fs::remove_file(&mem);
        if let Some(dir) = mem.parent().filter(|d| d != &run_dir) {
            let _ = std::fs::remove_dir(dir);
        }
    } else {
        std::fs::write(&mem, keep).map_err(|e| format!("{}: {e}", mem.display()))?;
    }
    Ok(gone)
}

/// What is enabled, and forwarding now.
pub fn status() -> Result<Status, String> {
    Ok(Status {
        entries: entries()?,
        ipv4_forwarding: forwarding(false).as_deref() == Some("1"),
        ipv6_forwarding: forwarding(true).as_deref() == Some("1"),
    })
}
