//! What wg-quick(8) does around a tunnel's device, on Linux:
//!
//! ```text
//!   up:   PreUp ─▶ device, addresses ─▶ routes ─▶ DNS ─▶ PostUp
//!         routes: Table = auto: allowed IPs into the main table, but a
//!                 default route (0.0.0.0/0, ::/0) into a table T of its own:
//!                   ip rule add not fwmark T table T
//!                   ip rule add table main suppress_prefixlength 0
//!                 and the tunnel's own packets carry mark T, so they still
//!                 leave through the underlay; Table = N: every route in N;
//!                 Table = off: no routes
//!   down: PreDown ─▶ DNS taken back ─▶ device gone ─▶ rules taken back ─▶ PostDown
//! ```
//! What is done is written to a record (`NAME.rules` in the run
//! directory) before it is done (the rules, the resolvconf entry) and, once
//! the tunnel is up, with its down hooks; so that after a crash the next
//! start, `up` or `down` of that name takes it back as a down would:
//! PreDown, rules, DNS, PostDown. A failed start takes back what it did,
//! without the down hooks (as wg-quick).

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tapir_sys::{Netlink, Rule};

use crate::config::Ops;
use crate::dev::DevError;

/// The main routing table.
const MAIN: u32 = tapir_sys::MAIN_TABLE;
/// Where wg-quick starts looking for a free table.
const FIRST_TABLE: u32 = 51820;

/// Set by SIGINT and SIGTERM in a tunnel's process (see
/// [`stop_up_hooks_on`]).
static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// From now on, a PreUp or PostUp that runs when `flag` is set is stopped,
/// and with it the start, which takes back what it did (a `tapir down`, or
/// `up` given up at the terminal, while a PostUp hangs).
pub fn stop_up_hooks_on(flag: Arc<AtomicBool>) {
    let _ = STOP.set(flag);
}

fn stopping() -> bool {
    STOP.get().is_some_and(|f| f.load(Ordering::Relaxed))
}

/// The shell of the hooks: bash, as wg-quick's (its manual's
/// `PostUp = wg set %i private-key <(...)` needs it), or `/bin/sh` where
/// there is none.
fn shell() -> &'static str {
    ["/bin/bash", "/usr/bin/bash"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("/bin/sh")
}

/// Runs `cmds` through bash (`-c`), `%i` replaced by `name`, in order;
/// their output goes where ours goes (the tunnel's log). The first that
/// fails stops the rest and is the error. Each runs in a process group of
/// its own: a PreUp or PostUp still running when the tunnel is asked to
/// stop is ended, group and all (SIGTERM, SIGKILL 3 s later), and is the
/// error; the down hooks run to their end, as wg-quick's do.
///
/// The name goes into the command as it is, as wg-quick puts it; so only
/// names of wg-quick's characters (`A-Z a-z 0-9 _ = + . -`) run hooks: the
/// kernel allows `;`, `$` or a backquote in a name, which the shell would
/// run.
pub fn run_hooks(stage: &str, cmds: &[String], name: &str) -> Result<(), DevError> {
    if cmds.is_empty() {
        return Ok(());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_=+.-".contains(*c)))
    {
        return Err(DevError::Invalid(format!(
            "{stage}: the tunnel's name {name} has '{c}', which the shell would read in its commands (%i): name it with letters, digits and _=+.- only, or remove the {stage} lines"
        )));
    }
    let sh = shell();
    let stoppable = matches!(stage, "PreUp" | "PostUp");
    for c in cmds {
        let cmd = c.replace("%i", name);
        if stoppable && stopping() {
            return Err(DevError::Invalid(format!(
                "{name}: {stage} = {cmd}: not run: the tunnel was asked to stop"
            )));
        }
        eprintln!("tapir: {name}: {stage}: {cmd}");
        let mut child = Command::new(sh)
            .arg("-c")
            .arg(&cmd)
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| DevError::Runtime(format!("{stage}: {sh}: {e}")))?;
        let status = if stoppable {
            wait_unless_stopped(&mut child)
        } else {
            child.wait().map(Some)
        }
        .map_err(|e| DevError::Runtime(format!("{stage}: waiting for {sh}: {e}")))?;
        let Some(status) = status else {
            return Err(DevError::Invalid(format!(
                "{name}: {stage} = {cmd}: stopped, its processes with it: the tunnel was asked to stop while it ran"
            )));
        };
        if !status.success() {
            return Err(DevError::Invalid(format!(
                "{name}: {stage} = {cmd}: {status}; fix the command or remove the line"
            )));
        }
    }
    Ok(())
}

/// Whether a process of group `pgid` lives (not a zombie).
fn group_lives(pgid: i32) -> bool {
    use tapir_sys::process::{pids, stat_fields};
    pids().into_iter().any(|n| {
        stat_fields(Path::new(&format!("/proc/{n}/stat"))).is_some_and(|f| {
            f.first().is_some_and(|st| st != "Z")
                && f.get(2).and_then(|g| g.parse().ok()) == Some(pgid)
        })
    })
}

/// Waits for a hook; if the tunnel is asked to stop first, ends its process
/// group (SIGTERM, SIGKILL to what lives of it 3 s later) and says `None`.
fn wait_unless_stopped(child: &mut Child) -> std::io::Result<Option<ExitStatus>> {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    let tick = Duration::from_millis(10);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if stopping() {
            // The shell is not reaped meanwhile: a zombie, it keeps its
            // group's id from being given to another group before the
            // SIGKILL. Each of the group has the 3 s to end (`a; b`: the
            // shell ends at once, `b` may have a trap to run).
            let pgid = child.id() as i32;
            let group = Pid::from_raw(pgid);
            let _ = killpg(group, Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(3);
            // (A walk of /proc each look: twenty a second.)
            while group_lives(pgid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if group_lives(pgid) {
                let _ = killpg(group, Signal::SIGKILL);
            }
            child.wait()?;
            return Ok(None);
        }
        std::thread::sleep(tick);
    }
}

/// The record of rules, one per line: `4|6 TABLE FWMARK|- not|- SUPPRESS|-`.
fn record_line(r: &Rule) -> String {
    let opt = |v: Option<u32>| v.map_or("-".to_string(), |v| v.to_string());
    format!(
        "{} {} {} {} {}\n",
        if r.v6 { 6 } else { 4 },
        r.table,
        opt(r.fwmark),
        if r.invert { "not" } else { "-" },
        opt(r.suppress_prefixlength)
    )
}

fn parse_record_line(line: &str) -> Option<Rule> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let [family, table, mark, invert, suppress] = f.as_slice() else {
        return None;
    };
    let opt = |s: &str| (s != "-").then(|| s.parse().ok()).flatten();
    Some(Rule {
        v6: *family == "6",
        priority: None,
        table: table.parse().ok()?,
        fwmark: opt(mark),
        invert: *invert == "not",
        suppress_prefixlength: opt(suppress),
    })
}

/// A line of the record that is not a rule: `dns IFACE` (resolvconf's
/// entry), `nft FAMILY TABLE` (a table of the tunnel's), `hook
/// PreDown|PostDown COMMAND`.
fn parse_other_line(line: &str) -> Option<(&str, &str)> {
    let (what, rest) = line.split_once(' ')?;
    matches!(what, "dns" | "hook" | "nft").then_some((what, rest))
}

/// The name of the tunnel's own nftables table (one per family).
fn firewall_table(name: &str) -> String {
    format!("tapir-{name}")
}

/// Deletes nftables table `family_table` (`ip tapir-wg0`); whether it was there.
fn delete_table(family_table: &str) -> bool {
    let ok = family_table.split_once(' ').is_some_and(|(f, t)| {
        matches!(f, "ip" | "ip6") && t.starts_with("tapir-") && !t.contains(['"', ';', ' '])
    });
    ok && crate::nat::nft(&format!("delete table {family_table}\n")).is_ok()
}

/// Takes back what the record at `path` holds, left by tunnel `name`,
/// which did not get to take it back itself, in the order of a down:
/// PreDown, the rules, the DNS entry, PostDown (the device went with the
/// process). Returns what it did, in words.
pub fn clear_leftovers(path: &Path, name: &str) -> Vec<String> {
    // Only a record tapir wrote, in a directory nobody else could put one
    // in: its hooks run as root.
    let trusted = path
        .parent()
        .map_or(Ok(()), crate::uapi::trusted_dir)
        .and_then(|()| crate::uapi::read_own_file(path));
    let text = match trusted {
        Ok(Some(text)) => text,
        Ok(None) => return Vec::new(),
        Err(e) => return vec![e],
    };
    let mut done = Vec::new();
    // The record's lines of one kind (`hook`, `nft`, `dns`), after the kind.
    let of = |kind: &'static str| {
        text.lines()
            .filter_map(parse_other_line)
            .filter(move |(w, _)| *w == kind)
            .map(|(_, rest)| rest)
    };
    let hooks = |stage: &str| -> Vec<String> {
        of("hook")
            .filter_map(|rest| rest.strip_prefix(stage)?.strip_prefix(' '))
            .map(str::to_owned)
            .collect()
    };
    let run = |stage: &str, done: &mut Vec<String>| {
        let cmds = hooks(stage);
        if cmds.is_empty() {
            return;
        }
        match run_hooks(stage, &cmds, name) {
            Ok(()) => done.push(format!("ran its {stage} ({})", cmds.join("; "))),
            Err(e) => done.push(format!("ran its {stage}: {e}")),
        }
    };
    run("PreDown", &mut done);
    if let Ok(mut nl) = Netlink::open() {
        for r in text.lines().filter_map(parse_record_line) {
            if nl.del_rule(&r).is_ok() {
                done.push(format!("removed `{r}`"));
            }
        }
    }
    for table in of("nft") {
        if delete_table(table) {
            done.push(format!("removed nftables table {table}"));
        }
    }
    for iface in of("dns") {
        if unset_resolvconf(iface) {
            done.push(format!("took its DNS back (resolvconf -d {iface})"));
        }
    }
    run("PostDown", &mut done);
    let _ = std::fs::remove_file(path);
    done
}

/// `resolvconf -d IFACE -f`; whether it ran and succeeded.
fn unset_resolvconf(iface: &str) -> bool {
    Command::new("resolvconf")
        .args(["-d", iface, "-f"])
        .stdin(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The name resolvconf knows the tunnel's DNS by, as wg-quick makes it:
/// the first `PREFIX*` of `/etc/resolvconf/interface-order` (Debian's
/// resolvconf: `tun.`) before the name, or the name alone (openresolv and
/// systemd-resolved's resolvconf have no such file).
fn resolvconf_iface(name: &str, order: Option<&str>) -> String {
    let prefix = order
        .into_iter()
        .flat_map(str::lines)
        .find_map(|l| {
            let p = l.trim().strip_suffix('*')?;
            (!p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
                .then(|| format!("{p}."))
        })
        .unwrap_or_default();
    format!("{prefix}{name}")
}

/// What was done around one tunnel, taken back on down (or when dropped
/// unfinished: a failed start).
pub struct Applied {
    name: String,
    rules: Vec<Rule>,
    record: PathBuf,
    table: Option<u32>,
    /// resolvconf's entry for the tunnel's DNS, when it made one.
    dns: Option<String>,
    /// Its nftables tables (`ip tapir-NAME`), with a default route.
    tables: Vec<String>,
    /// The protocol of its own packets (`udp`, `tcp`), for the firewall.
    l4: &'static str,
    pre_down: Vec<String>,
    post_down: Vec<String>,
    /// The tunnel is up: its down hooks are in the record.
    up: bool,
    finished: bool,
}

impl Applied {
    /// Nothing done yet for tunnel `name`, whose own packets are `l4`
    /// (`udp`, `tcp`); what it does is recorded at `record`.
    pub fn new(name: &str, ops: &Ops, record: PathBuf, l4: &'static str) -> Self {
        Self {
            name: name.to_owned(),
            rules: Vec::new(),
            record,
            table: None,
            dns: None,
            tables: Vec::new(),
            l4,
            pre_down: ops.pre_down.clone(),
            post_down: ops.post_down.clone(),
            up: false,
            finished: false,
        }
    }

    /// The mark the tunnel's own packets must carry: the table of its
    /// default routes, if it has any.
    pub fn mark(&self) -> Option<u32> {
        self.table
    }

    /// Writes the record again: the rules, the DNS entry and, once up,
    /// the down hooks.
    fn save_record(&self) {
        let mut text: String = self.rules.iter().map(record_line).collect();
        if let Some(iface) = &self.dns {
            text += &format!("dns {iface}\n");
        }
        for t in &self.tables {
            text += &format!("nft {t}\n");
        }
        if self.up {
            for (stage, cmds) in [("PreDown", &self.pre_down), ("PostDown", &self.post_down)] {
                for c in cmds {
                    text += &format!("hook {stage} {c}\n");
                }
            }
        }
        // Not through a link (the run directory is root's own, checked at
        // up; this holds for `tapir run` given another directory too).
        let written = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.record)
            .and_then(|mut f| f.write_all(text.as_bytes()));
        if let Err(e) = written {
            eprintln!(
                "tapir: {}: warning: cannot record what the tunnel sets up in {} ({e}): after a crash, take its rules and DNS back by hand",
                self.name,
                self.record.display()
            );
        }
    }

    /// The tunnel is up (PostUp has run): from now on a crash is taken
    /// back with its down hooks.
    pub fn up_done(&mut self) {
        self.up = true;
        if !self.pre_down.is_empty() || !self.post_down.is_empty() {
            self.save_record();
        }
    }

    fn add_rule(&mut self, nl: &mut Netlink, rule: Rule) -> Result<(), DevError> {
        // Recorded first: a crash right after the kernel took it leaves a
        // record of it, not a rule nobody knows about.
        self.rules.push(rule);
        self.save_record();
        nl.add_rule(self.rules.last().expect("just pushed"))
            .map_err(DevError::from)
    }

    /// A default route (`net` is `0.0.0.0/0` or `::/0`) into the tunnel,
    /// as wg-quick does it: into table `fwmark` (or the first free table
    /// from 51820), with the two rules that keep the tunnel's own packets
    /// (marked) and the more specific routes of the main table out of it.
    pub fn default_route(
        &mut self,
        nl: &mut Netlink,
        index: u32,
        net: IpNet,
        fwmark: Option<u32>,
    ) -> Result<(), DevError> {
        let table = match self.table {
            Some(t) => t,
            None => {
                let t = match fwmark {
                    Some(m) => m,
                    None => {
                        let mut t = FIRST_TABLE;
                        while nl.table_in_use(t)? {
                            t += 1;
                        }
                        t
                    }
                };
                self.table = Some(t);
                t
            }
        };
        let v6 = net.addr().is_ipv6();
        if !self.rules.iter().any(|r| r.v6 == v6) {
            self.add_rule(
                nl,
                Rule {
                    v6,
                    priority: None,
                    table,
                    fwmark: Some(table),
                    invert: true,
                    suppress_prefixlength: None,
                },
            )?;
            self.add_rule(
                nl,
                Rule {
                    v6,
                    priority: None,
                    table: MAIN,
                    fwmark: None,
                    invert: false,
                    suppress_prefixlength: Some(0),
                },
            )?;
            if !v6 {
                valid_mark()
            }
            self.add_firewall(nl, index, v6, table);
        }
        nl.add_route_in(index, net, table)?;
        eprintln!(
            "tapir: {}: {net} through the tunnel: routing table {table}, the tunnel's own packets marked {table:#x}",
            self.name
        );
        Ok(())
    }

    /// wg-quick's firewall for a default route, in a table of the tunnel's
    /// own (`ip tapir-NAME`, `ip6 tapir-NAME`): packets for the tunnel's
    /// addresses that come from elsewhere than the tunnel and not from this
    /// host are dropped (else, with the whole traffic routed into the
    /// tunnel, a host on the local network could reach them), and the
    /// tunnel's own packets' mark is kept in conntrack, so that their
    /// answers carry it back (the reverse-path filter wants it: see
    /// `valid_mark`). Without nft: a warning, as the routing works without it.
    fn add_firewall(&mut self, nl: &mut Netlink, index: u32, v6: bool, mark: u32) {
        let pf = if v6 { "ip6" } else { "ip" };
        let t = format!("{pf} {}", firewall_table(&self.name));
        let mut script = format!(
            "add table {t}\n\
             add chain {t} preraw {{ type filter hook prerouting priority -300; }}\n\
             add chain {t} premangle {{ type filter hook prerouting priority -150; }}\n\
             add chain {t} postmangle {{ type filter hook postrouting priority -150; }}\n"
        );
        let addrs = nl.addresses(Some(index)).unwrap_or_default();
        for a in addrs.iter().filter(|a| a.local.addr().is_ipv6() == v6) {
            script += &format!(
                "add rule {t} preraw iifname != \"{}\" {pf} daddr {} fib saddr type != local drop\n",
                self.name,
                a.local.addr()
            );
        }
        let l4 = self.l4;
        script += &format!(
            "add rule {t} postmangle meta l4proto {l4} mark {mark} ct mark set mark\n\
             add rule {t} premangle meta l4proto {l4} meta mark set ct mark\n"
        );
        // Recorded first, as the rules are.
        self.tables.push(t.clone());
        self.save_record();
        if let Err(e) = crate::nat::nft(&script) {
            self.tables.pop();
            self.save_record();
            eprintln!(
                "tapir: {}: warning: no firewall for the default route ({e}): packets for the tunnel's addresses are not kept to the tunnel",
                self.name
            );
        }
    }

    fn take_back_firewall(&mut self) {
        for t in std::mem::take(&mut self.tables) {
            delete_table(&t);
        }
    }

    /// Name servers and search domains through resolvconf, as wg-quick
    /// does (interface `tun.NAME` with Debian's resolvconf, `NAME` with
    /// others: see `resolvconf_iface`). Without resolvconf, or where it
    /// fails, the error (the tunnel does not start, as wg-quick's does
    /// not): up without its name servers, the host's queries would go where
    /// they went before, past the tunnel.
    pub fn set_dns(&mut self, dns: &[String]) -> Result<(), String> {
        if dns.is_empty() {
            return Ok(());
        }
        if which("resolvconf").is_none() {
            return Err(format!(
                "DNS = {}: resolvconf is not installed, and without it the host would go on asking its old name servers, past the tunnel: apt install openresolv (or resolvconf; with systemd-resolved, its resolvconf link), or remove the DNS line",
                dns.join(", ")
            ));
        }
        let (servers, search): (Vec<&String>, Vec<&String>) =
            dns.iter().partition(|d| d.parse::<IpAddr>().is_ok());
        let mut text: String = servers
            .iter()
            .map(|s| format!("nameserver {s}\n"))
            .collect();
        if !search.is_empty() {
            text += &format!(
                "search {}\n",
                search
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        let order = std::fs::read_to_string("/etc/resolvconf/interface-order").ok();
        let iface = resolvconf_iface(&self.name, order.as_deref());
        // Recorded first, as the rules are.
        self.dns = Some(iface.clone());
        self.save_record();
        let child = Command::new("resolvconf")
            .args(["-a", &iface, "-m", "0", "-x"])
            .stdin(Stdio::piped())
            .spawn();
        let ok = child.and_then(|mut c| {
            if let Some(mut i) = c.stdin.take() {
                // One that exits without reading it says why by its status
                // (a broken pipe said nothing).
                let _ = i.write_all(text.as_bytes());
            }
            c.wait()
        });
        // Failed, it stays recorded: the start's undoing runs `resolvconf -d
        // -f` for it, which takes back whatever part of `-a` was done (an
        // entry written under /run before /etc/resolv.conf could not be,
        // exclusive and first, would otherwise wait for the next
        // `resolvconf -u` to send the host's queries to the tunnel's
        // servers), and is harmless where nothing was.
        match ok {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("DNS: resolvconf -a {iface}: {s}")),
            Err(e) => Err(format!("DNS: resolvconf: {e}")),
        }
    }

    fn unset_dns(&mut self) {
        if let Some(iface) = self.dns.take() {
            unset_resolvconf(&iface);
        }
    }

    /// The rules and firewall taken back, and the record with them (all it
    /// holds is done with).
    fn take_back_rules(&mut self) {
        self.take_back_firewall();
        if !self.rules.is_empty() {
            if let Ok(mut nl) = Netlink::open() {
                for r in self.rules.iter().rev() {
                    if let Err(e) = nl.del_rule(r) {
                        eprintln!("tapir: {}: cannot remove `{r}`: {e}", self.name);
                    }
                }
            }
            self.rules.clear();
        }
        let _ = std::fs::remove_file(&self.record);
    }

    /// The record's directory, if it is a namespace's own and now empty.
    fn tidy(&self) {
        if let Some(dir) = self.record.parent() {
            if dir
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("netns-"))
            {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }

    /// Before the device goes: PreDown, then DNS taken back.
    pub fn before_down(&mut self) {
        if let Err(e) = run_hooks("PreDown", &self.pre_down, &self.name) {
            eprintln!("tapir: {}: {e}", self.name);
        }
        self.unset_dns();
    }

    /// After the device went: the rules taken back, then PostDown.
    pub fn after_down(&mut self) {
        self.take_back_rules();
        if let Err(e) = run_hooks("PostDown", &self.post_down, &self.name) {
            eprintln!("tapir: {}: {e}", self.name);
        }
        self.tidy();
        self.finished = true;
    }
}

impl Drop for Applied {
    fn drop(&mut self) {
        if !self.finished {
            // A start that failed: what it did is taken back, without the
            // down hooks (it never came up).
            self.unset_dns();
            self.take_back_rules();
            self.tidy();
        }
    }
}

/// The routes through the tunnel's device, read once (one dump of every
/// table) and kept as [`DeviceRoutes::add`] and [`DeviceRoutes::del`]
/// change them: a dump for each route made 10,000 allowed IPs take
/// minutes (quadratic), and `up` gave up on them.
pub struct DeviceRoutes {
    index: u32,
    /// The kernel's own routes through the device in main: its addresses'
    /// subnets, which cover the allowed IPs inside them.
    kernel: Vec<IpNet>,
    /// The other routes through the device: (prefix, table).
    added: std::collections::HashSet<(IpNet, u32)>,
}

impl DeviceRoutes {
    /// The routes through device `index` now.
    pub fn read(nl: &mut Netlink, index: u32) -> Result<Self, DevError> {
        let all = nl.routes_all()?;
        let through = |r: &&tapir_sys::Route| r.oif == Some(index);
        Ok(Self {
            index,
            kernel: all
                .iter()
                .filter(through)
                .filter(|r| r.table == MAIN && r.protocol == "kernel")
                .map(|r| r.dst)
                .collect(),
            added: all
                .iter()
                .filter(through)
                .filter(|r| r.protocol != "kernel")
                .map(|r| (r.dst, r.table))
                .collect(),
        })
    }

    /// The route to `net` through the device (named `dev`), in `table`
    /// (`None`: main), as wg-quick adds it: not where an address's subnet
    /// on the device covers `net` already, nor twice; and refused, naming
    /// the holder, where another device has that very route (traffic for
    /// `net` would pass the tunnel by; wg-quick fails the same).
    pub fn add(
        &mut self,
        nl: &mut Netlink,
        dev: &str,
        net: IpNet,
        table: Option<u32>,
    ) -> Result<(), DevError> {
        let t = table.unwrap_or(MAIN);
        if (table.is_none() && self.kernel.iter().any(|k| k.contains(&net)))
            || self.added.contains(&(net, t))
        {
            return Ok(());
        }
        let added = match table {
            Some(t) => nl.add_route_in(self.index, net, t),
            None => nl.add_route(self.index, net, None),
        };
        match added {
            Ok(()) => {
                self.added.insert((net, t));
                Ok(())
            }
            Err(e) if e.errno() == Some(libc::EEXIST) => {
                let holder = nl
                    .routes_in(t)?
                    .into_iter()
                    .find(|r| r.dst == net)
                    .and_then(|r| r.oif)
                    .and_then(|i| nl.links().ok()?.into_iter().find(|l| l.index == i))
                    .map_or_else(|| "another route".to_string(), |l| l.name);
                Err(DevError::Invalid(format!(
                    "AllowedIPs {net}: {holder} already has the route to {net}{} (ip route show {net}{}), so its traffic would not go through {dev}: remove that route, or leave {net} out of AllowedIPs (Table = off adds no routes)",
                    if t == MAIN {
                        String::new()
                    } else {
                        format!(" in table {t}")
                    },
                    if t == MAIN {
                        String::new()
                    } else {
                        format!(" table {t}")
                    },
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Takes back the route to `net` that [`DeviceRoutes::add`] added (an
    /// address's subnet, the kernel's, is left alone).
    pub fn del(
        &mut self,
        nl: &mut Netlink,
        net: IpNet,
        table: Option<u32>,
    ) -> Result<(), DevError> {
        let t = table.unwrap_or(MAIN);
        if self.added.remove(&(net, t)) {
            nl.del_route_in(self.index, net, t)?;
        }
        Ok(())
    }
}

/// As wg-quick: `net.ipv4.conf.all.src_valid_mark = 1`, so that the
/// reverse-path filter sees the mark of the tunnel's own packets.
fn valid_mark() {
    let path = "/proc/sys/net/ipv4/conf/all/src_valid_mark";
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "0") {
        let _ = std::fs::write(path, "1");
    }
}

/// The program `name` on PATH.
fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_reads_back_what_it_wrote() {
        let rules = [
            Rule {
                v6: false,
                priority: None,
                table: 51820,
                fwmark: Some(51820),
                invert: true,
                suppress_prefixlength: None,
            },
            Rule {
                v6: true,
                priority: None,
                table: MAIN,
                fwmark: None,
                invert: false,
                suppress_prefixlength: Some(0),
            },
        ];
        for r in rules {
            assert_eq!(parse_record_line(&record_line(&r)), Some(r));
        }
        assert_eq!(parse_record_line("garbage"), None);
        assert_eq!(parse_record_line("dns tun.wg0"), None);
        assert_eq!(parse_other_line("dns tun.wg0"), Some(("dns", "tun.wg0")));
        assert_eq!(
            parse_other_line("hook PostDown iptables -D x; echo a b"),
            Some(("hook", "PostDown iptables -D x; echo a b"))
        );
        assert_eq!(parse_other_line("4 254 - - 0"), None);
    }

    #[test]
    fn resolvconf_knows_the_dns_by_the_name_wg_quick_gives_it() {
        // Debian's resolvconf orders interfaces; its first pattern names them.
        let debian = "# interface-order\nlo.inet6\nlo.inet\nlo.@(dnsmasq|pdnsd)\nlo.!(pdns|pdns-recursor)\nlo\ntun*\ntap*\nhso*\nen*\neth*\n";
        assert_eq!(resolvconf_iface("wg0", Some(debian)), "tun.wg0");
        // openresolv, systemd-resolved: no such file.
        assert_eq!(resolvconf_iface("wg0", None), "wg0");
        assert_eq!(resolvconf_iface("wg0", Some("lo\neth*\n")), "eth.wg0");
        assert_eq!(resolvconf_iface("wg0", Some("*\nlo.@(x)*\n")), "wg0");
    }

    #[test]
    fn hooks_run_in_order_with_the_name_and_stop_at_the_first_failure() {
        let dir = std::env::temp_dir().join(format!("tapir-hooks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log");
        let cmds = [
            format!("echo one %i >> {}", log.display()),
            format!("echo two %i >> {}", log.display()),
            "exit 3".to_string(),
            format!("echo never >> {}", log.display()),
        ];
        let e = run_hooks("PostUp", &cmds, "tq9").unwrap_err().to_string();
        assert!(e.contains("PostUp = exit 3") && e.contains("3"), "{e}");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "one tq9\ntwo tq9\n");
        // A name the shell would read: no command runs.
        let e = run_hooks("PostUp", &cmds, "tq;touch${IFS}x")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("has ';'") && e.contains("remove the PostUp lines"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "one tq9\ntwo tq9\n");
        assert!(
            run_hooks("PostUp", &[], "tq;x").is_ok(),
            "no hooks, no rule"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
