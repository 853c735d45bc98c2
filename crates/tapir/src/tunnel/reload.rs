//! `tapir reload NAME` and SIGHUP: a changed config applied without
//! dropping anyone, as `wg syncconf` does, and a little more.
//!
//! ```text
//!   control thread: read the file ─▶ whole and valid? ─no─▶ refused, the tunnel untouched
//!                                  └─yes─▶ endpoints resolved ─▶ Request::Apply(peers, key, port) ─▶ packet thread:
//!                                            port and key as the file's (a `wg set` undone, as `wg syncconf` does);
//!                                            peers added, removed, changed; unchanged ones keep their sessions
//!                   ─▶ routes of allowed IPs added and removed (tun mode, as at start)
//!                   ─▶ what a reload cannot change (addresses, MTU, hooks...) named: down and up applies it
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use tapir_proto::wg::keys::PublicKey;
use tapir_proto::wg::tunnel::{PeerConfig, Tunnel};
use tapir_sys::{Mode, Netlink};

use crate::config::{self, Table, TunnelConfig};
use crate::uapi::Reapply;

/// What the control thread keeps to reload a tunnel.
#[derive(Clone)]
pub struct Reloader {
    file: PathBuf,
    current: TunnelConfig,
    /// The device's routes, where a reload could not make them all (else
    /// they are `current`'s): the next one makes what is missing.
    made: Option<Vec<IpNet>>,
}

/// A reload, prepared: everything read and checked, nothing applied yet.
pub struct Plan {
    /// The peers as they should be.
    pub peers: Vec<PeerConfig>,
    config: TunnelConfig,
    /// Changes a reload does not make.
    pub notes: Vec<String>,
}

impl Plan {
    /// What the packet thread is asked to make of the tunnel: the peers,
    /// the key and the port (compared there with what runs, so that a key
    /// or port changed by `wg set` goes back to the file's, as
    /// `wg syncconf` would have it).
    pub fn reapply(&self) -> Reapply {
        Reapply {
            peers: self.peers.clone(),
            private_key: self.config.private_key.clone(),
            listen_port: self.config.listen_port,
            host_names: super::host_names(&self.config),
        }
    }

    /// What to say when the packet thread could not move to the file's
    /// port (`errno`), named as the file names it.
    pub fn port_refused(&self, errno: i32) -> String {
        let key = if self.config.file.extension().is_some_and(|e| e == "toml") {
            toml_key("ListenPort")
        } else {
            "ListenPort"
        };
        let port = self.config.listen_port.unwrap_or(0);
        if errno == libc::EOPNOTSUPP {
            return format!(
                "{key} changed: over TCP a reload does not move the listener (tapir down {0}, then up)",
                self.config.name
            );
        }
        format!(
            "{key} = {port} not applied: {}; the tunnel keeps its port",
            std::io::Error::from_raw_os_error(errno)
        )
    }
}

/// What applying the peers did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Peers added, removed, changed; the rest kept as they were.
    pub added: usize,
    /// Removed.
    pub removed: usize,
    /// Changed (sessions kept).
    pub changed: usize,
}

/// The routes a config gives its tunnel's device (those a reload may
/// change): with `Table = auto` not the default routes, which go through
/// rules of their own (a change of them is named, not made).
fn routes(c: &TunnelConfig) -> Vec<IpNet> {
    if c.mode != Mode::Tun || c.ops.table == Table::Off {
        return Vec::new();
    }
    match &c.routes {
        Some(r) => r.clone(),
        None => c
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().map(IpNet::trunc))
            .filter(|n| n.prefix_len() > 0 || c.ops.table != Table::Auto)
            .collect(),
    }
}

/// A wg-quick key as the TOML form names it (`ListenPort`: `listen_port`).
fn toml_key(wg: &str) -> &str {
    match wg {
        "ListenPort" => "listen_port",
        "Address" => "addresses",
        "MTU" => "mtu",
        "Mode" => "mode",
        "MAC" => "mac",
        "Bridge" => "bridge",
        "Transport" => "transport",
        "Table" => "table",
        "FwMark" => "fwmark",
        "DNS" => "dns",
        "PreUp" => "pre_up",
        "PostUp" => "post_up",
        "PreDown" => "pre_down",
        "PostDown" => "post_down",
        "User" => "user",
        other => other,
    }
}

impl Reloader {
    /// For the tunnel started from `current`.
    pub fn new(current: TunnelConfig) -> Self {
        Self {
            file: current.file.clone(),
            current,
            made: None,
        }
    }

    /// The file it reloads.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The configuration in force, as last read or reloaded.
    #[cfg(test)]
    pub(crate) fn current(&self) -> &TunnelConfig {
        &self.current
    }

    /// Reads the file again and checks it whole: an error refuses the
    /// reload, leaving the tunnel as it is.
    pub fn prepare(&self) -> Result<Plan, String> {
        let name = &self.current.name;
        let all = config::load_any(&self.file).map_err(|e| e.to_string())?;
        let new = all
            .into_iter()
            .find(|c| c.name == *name)
            .ok_or_else(|| format!("{} no longer describes {name}", self.file.display()))?;
        let mut peers = super::peer_configs(&new).map_err(|e| e.to_string())?;
        // A keepalive the file turns off (0, off) travels as a zero
        // interval, for `apply` to tell it from one the file leaves out.
        for (p, c) in peers.iter_mut().zip(&new.peers) {
            if c.keepalive == Some(0) {
                p.keepalive = Some(std::time::Duration::ZERO);
            }
        }
        let old = &self.current;
        let mut notes = Vec::new();
        // Named as the file names them: wg-quick's keys, or the TOML form's.
        let toml = self.file.extension().is_some_and(|e| e == "toml");
        let mut differs = |what: &str, changed: bool| {
            if changed {
                let what = if toml { toml_key(what) } else { what };
                notes.push(format!(
                    "{what} changed: a reload does not apply it (tapir down {name}, then up)"
                ));
            }
        };
        differs("Address", new.addresses != old.addresses);
        differs("MTU", new.mtu != old.mtu || new.mtu_auto != old.mtu_auto);
        differs("Mode", new.mode != old.mode);
        differs("MAC", new.mac != old.mac);
        differs("Bridge", new.bridge != old.bridge);
        differs("Transport", new.transport != old.transport);
        differs("Table", new.ops.table != old.ops.table);
        differs("FwMark", new.ops.fwmark != old.ops.fwmark);
        differs("DNS", new.ops.dns != old.ops.dns);
        // The hooks of the run are the ones it started with (its down hooks
        // included: those run at down).
        for (key, a, b) in [
            ("PreUp", &new.ops.pre_up, &old.ops.pre_up),
            ("PostUp", &new.ops.post_up, &old.ops.post_up),
            ("PreDown", &new.ops.pre_down, &old.ops.pre_down),
            ("PostDown", &new.ops.post_down, &old.ops.post_down),
        ] {
            differs(key, a != b);
        }
        differs("SaveConfig", new.ops.save_config != old.ops.save_config);
        differs("User", new.ops.user != old.ops.user);
        let defaults = |c: &TunnelConfig| {
            c.peers
                .iter()
                .flat_map(|p| p.allowed_ips.iter())
                .filter(|n| n.prefix_len() == 0)
                .count()
        };
        differs(
            "A default route (0.0.0.0/0 or ::/0)",
            defaults(&new) != defaults(old) && new.ops.table == Table::Auto,
        );
        Ok(Plan {
            peers,
            config: new,
            notes,
        })
    }

    /// After the packet thread applied `plan.peers`: the device's routes
    /// follow the allowed IPs, and the plan becomes the current config.
    /// Returns what could not be done.
    pub fn finish(&mut self, plan: Plan) -> Vec<String> {
        let mut problems = Vec::new();
        let old = self.made.take().unwrap_or_else(|| routes(&self.current));
        // The new peers' and routes under the running mode and table: a
        // Table or Mode changed in the file is not applied (it is named),
        // and its routes must not be either (Table auto to 1234 put
        // 0.0.0.0/0 into the main table; auto to off took every route).
        let mut next = self.current.clone();
        next.peers = plan.config.peers.clone();
        next.routes = plan.config.routes.clone();
        let new = routes(&next);
        if old != new {
            let (now, refused) = route_changes(&self.current, &old, &new);
            if !refused.is_empty() {
                // Recorded as they are: the next reload tries again (it
                // found the file unchanged and said all was well).
                problems.push(format!("routes: {}", refused.join("; ")));
                self.made = Some(now);
            }
        }
        // What the tunnel runs by now: the new peers and routes, and what a
        // reload does not apply as it was, so that the next reload compares
        // with what runs (and names a change it did not apply again).
        let mut running = self.current.clone();
        running.peers = plan.config.peers;
        running.routes = plan.config.routes;
        running.warnings = plan.config.warnings;
        self.current = running;
        problems
    }
}

/// Moves the device's routes from `old` to `new`: the routes there after,
/// and what could not be done, each named (the others are done).
fn route_changes(c: &TunnelConfig, old: &[IpNet], new: &[IpNet]) -> (Vec<IpNet>, Vec<String>) {
    let mut nl = match Netlink::open() {
        Ok(nl) => nl,
        Err(e) => return (old.to_vec(), vec![e.to_string()]),
    };
    let index = match nl.link(c.name.as_str()) {
        Ok(Some(l)) => l.index,
        Ok(None) => return (old.to_vec(), vec![format!("{} is gone", c.name)]),
        Err(e) => return (old.to_vec(), vec![e.to_string()]),
    };
    let table = match c.ops.table {
        Table::Id(t) => Some(t),
        _ => None,
    };
    let mut book = match super::ops::DeviceRoutes::read(&mut nl, index) {
        Ok(b) => b,
        Err(e) => return (old.to_vec(), vec![e.to_string()]),
    };
    let (old_set, new_set): (HashSet<&IpNet>, HashSet<&IpNet>) =
        (old.iter().collect(), new.iter().collect());
    let (mut now, mut refused) = (Vec::new(), Vec::new());
    for net in old {
        if new_set.contains(net) {
            now.push(*net);
        } else if let Err(e) = book.del(&mut nl, *net, table) {
            refused.push(e.to_string());
            now.push(*net);
        }
    }
    for net in new.iter().filter(|n| !old_set.contains(n)) {
        match book.add(&mut nl, c.name.as_str(), *net, table) {
            Ok(()) => now.push(*net),
            Err(e) => refused.push(e.to_string()),
        }
    }
    (now, refused)
}

/// Makes the tunnel's peers `want`: new ones added, missing ones removed,
/// changed ones updated in place; an unchanged peer is not touched, so
/// its session and counters go on.
///
/// The packet thread runs it with the tunnel locked: the peers that go
/// leave together (many in one rebuild of the indices and routes, a few
/// one at a time at a cost that does not grow with the peers: see
/// `Tunnel::remove_peers`), and each wanted peer is found by its key, not
/// by a walk over the peers (with 10,000 peers, half of them going, one
/// rebuild each would have held packets up for seconds), nor in a copy of
/// them all: a reload of 10,000 unchanged peers holds it 1.5-2.3 ms (3.2-7.3
/// with the copy, release build, one run each).
pub fn apply(tunnel: &mut Tunnel, mut want: Vec<PeerConfig>) -> Applied {
    let mut done = Applied::default();
    // In tun mode a prefix is one peer's, the last the file gives it to (as
    // `wg syncconf` leaves it): the others are wanted without it, so that
    // a peer that lost it is not "changed" at the next reload and takes it
    // back (the owner flipped at each reload of an unchanged file).
    if tunnel.layer() == tapir_proto::wg::tunnel::Layer::Ip {
        // (Fx, not SipHash: the keys are the file's, and there are many.)
        let mut last: rustc_hash::FxHashMap<IpNet, usize> = Default::default();
        for (i, w) in want.iter().enumerate() {
            for net in &w.allowed_ips {
                last.insert(net.trunc(), i);
            }
        }
        for (i, w) in want.iter_mut().enumerate() {
            w.allowed_ips.retain(|n| last.get(&n.trunc()) == Some(&i));
        }
    }
    let wanted: rustc_hash::FxHashSet<PublicKey> = want.iter().map(|w| w.public).collect();
    let gone: HashSet<PublicKey> = tunnel
        .peers()
        .map(|(c, _, _)| c.public)
        .filter(|k| !wanted.contains(k))
        .collect();
    done.removed = tunnel.remove_peers(&gone);
    for mut w in want {
        // (A zero keepalive: the file turns it off; none: it says nothing.)
        let off = w.keepalive.is_some_and(|k| k.is_zero());
        if off {
            w.keepalive = None;
        }
        // Each peer looked up by its key, not a copy of them all (10,000
        // copies were most of a reload's hold on the packet thread).
        let Some((h, _)) = tunnel.peer_config(&w.public) else {
            tunnel.add_peer(w);
            done.added += 1;
            continue;
        };
        // What the file leaves out stays as it runs (set with `wg set`,
        // say), as `wg syncconf` leaves it.
        if w.endpoint.is_none() {
            w.endpoint = h.endpoint;
        }
        if w.keepalive.is_none() && !off {
            w.keepalive = h.keepalive;
        }
        let psk = match &w.psk {
            None => true,
            given => *given == h.psk,
        };
        let same = psk
            && h.endpoint == w.endpoint
            && h.allowed_ips == w.allowed_ips
            && h.keepalive == w.keepalive
            && h.rate == w.rate;
        if !same {
            let key = w.public;
            tunnel.update_peer(&key, |c| {
                let psk = c.psk.take();
                *c = w;
                c.psk = c.psk.take().or(psk);
            });
            done.changed += 1;
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapir_proto::wg::keys::{PresharedKey, PrivateKey};

    fn peer(seed: u8, ip: &str) -> PeerConfig {
        PeerConfig {
            public: PrivateKey::from_random([seed; 32]).public_key(),
            psk: None,
            endpoint: None,
            allowed_ips: vec![ip.parse().unwrap()],
            keepalive: None,
            rate: None,
        }
    }

    #[test]
    fn a_prefix_two_peers_list_stays_the_last_ones_reload_after_reload() {
        let mut t = Tunnel::new(PrivateKey::from_random([1; 32]), vec![]);
        let mut a = peer(2, "10.0.0.2/32");
        a.allowed_ips.push("10.250.0.1/32".parse().unwrap());
        let b = peer(3, "10.250.0.1/32");
        let file = vec![a.clone(), b.clone()];
        assert_eq!(apply(&mut t, file.clone()).added, 2);
        let owner = |t: &Tunnel| {
            t.peers()
                .find(|(c, _, _)| {
                    c.allowed_ips
                        .iter()
                        .any(|n| n.to_string() == "10.250.0.1/32")
                })
                .map(|(c, _, _)| c.public)
        };
        assert_eq!(owner(&t), Some(b.public));
        for _ in 0..3 {
            assert_eq!(apply(&mut t, file.clone()), Applied::default());
            assert_eq!(owner(&t), Some(b.public));
        }
    }

    #[test]
    fn adds_removes_and_changes_and_leaves_the_rest_alone() {
        let mut t = Tunnel::new(
            PrivateKey::from_random([1; 32]),
            vec![
                peer(2, "10.0.0.2/32"),
                peer(3, "10.0.0.3/32"),
                peer(4, "10.0.0.4/32"),
            ],
        );
        let mut changed = peer(3, "10.0.0.33/32");
        changed.keepalive = Some(std::time::Duration::from_secs(25));
        let done = apply(
            &mut t,
            vec![peer(2, "10.0.0.2/32"), changed, peer(5, "10.0.0.5/32")],
        );
        assert_eq!(
            done,
            Applied {
                added: 1,
                removed: 1,
                changed: 1
            }
        );
        let keys: Vec<_> = t.peers().map(|(c, _, _)| c.public).collect();
        assert_eq!(keys.len(), 3);
        assert!(!keys.contains(&PrivateKey::from_random([4; 32]).public_key()));
        let three = t
            .peers()
            .find(|(c, _, _)| c.public == PrivateKey::from_random([3; 32]).public_key())
            .unwrap()
            .0
            .clone();
        assert_eq!(
            three.allowed_ips,
            vec!["10.0.0.33/32".parse::<IpNet>().unwrap()]
        );
        // Again: nothing to do.
        let same: Vec<_> = t.peers().map(|(c, _, _)| c.clone()).collect();
        assert_eq!(apply(&mut t, same.clone()), Applied::default());
        // A preshared key given, then another, then the same again.
        let mut with = same.clone();
        with[0].psk = Some(PresharedKey::from_random([7; 32]));
        assert_eq!(apply(&mut t, with.clone()).changed, 1);
        with[0].psk = Some(PresharedKey::from_random([8; 32]));
        assert_eq!(apply(&mut t, with.clone()).changed, 1);
        assert_eq!(apply(&mut t, with.clone()), Applied::default());
        // What the file leaves out (an endpoint, a keepalive, a key set with
        // `wg set`) stays as it runs, as `wg syncconf` leaves it.
        t.update_peer(&with[0].public, |c| {
            c.endpoint = Some("192.0.2.9:51821".parse().unwrap());
            c.keepalive = Some(std::time::Duration::from_secs(9));
        });
        let mut bare = with.clone();
        bare[0].psk = None;
        assert_eq!(apply(&mut t, bare), Applied::default());
        let (c, _, _) = t
            .peers()
            .find(|(c, _, _)| c.public == with[0].public)
            .unwrap();
        assert_eq!(c.endpoint, Some("192.0.2.9:51821".parse().unwrap()));
        assert_eq!(c.keepalive, Some(std::time::Duration::from_secs(9)));
        assert!(c.psk.is_some());
        // A keepalive the file turns off (PersistentKeepalive = 0 or off:
        // a zero interval here) goes off, as wg syncconf turns it off.
        let mut off = with.clone();
        off[0].keepalive = Some(std::time::Duration::ZERO);
        assert_eq!(apply(&mut t, off).changed, 1);
        let (c, _, _) = t
            .peers()
            .find(|(c, _, _)| c.public == with[0].public)
            .unwrap();
        assert_eq!(c.keepalive, None);
    }

    #[test]
    fn what_a_reload_cannot_change_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tapir-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tq8.conf");
        let key = PrivateKey::from_random([3; 32]).to_base64();
        let write = |interface: &str| {
            std::fs::write(
                &file,
                format!("[Interface]\nPrivateKey = {key}\n{interface}\n"),
            )
            .unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        write("PostDown = echo old\nMTU = 1400");
        let mut r = Reloader::new(crate::config::load_any(&file).unwrap().remove(0));
        write("PostDown = echo new\nPostUp = true\nSaveConfig = true");
        // Twice: what was not applied is still not, and named again.
        for _ in 0..2 {
            let plan = r.prepare().unwrap();
            let notes = plan.notes.join("\n");
            for what in [
                "PostDown changed",
                "PostUp changed",
                "SaveConfig changed",
                "MTU changed",
            ] {
                assert!(notes.contains(what), "{what}: {notes}");
            }
            assert!(!notes.contains("PreUp"), "{notes}");
            assert!(r.finish(plan).is_empty());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_toml_files_unapplied_changes_are_named_by_its_own_keys() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tapir-reload-toml-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t.toml");
        let key = PrivateKey::from_random([3; 32]).to_base64();
        let write = |mark: u16| {
            std::fs::write(
                &file,
                format!(
                    "[[tunnel]]\nname = \"tq7\"\nprivate_key = \"{key}\"\nlisten_port = {mark}\nfwmark = {mark}\n"
                ),
            )
            .unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        write(51820);
        let r = Reloader::new(crate::config::load_any(&file).unwrap().remove(0));
        write(51821);
        let plan = r.prepare().unwrap();
        let notes = plan.notes.join("\n");
        assert!(
            notes.contains("fwmark changed") && !notes.contains("FwMark"),
            "{notes}"
        );
        // The port is the packet thread's to move (it may be refused).
        assert!(!notes.contains("listen_port"), "{notes}");
        assert_eq!(plan.reapply().listen_port, Some(51821));
        let refused = plan.port_refused(libc::EADDRINUSE);
        assert!(
            refused.starts_with("listen_port = 51821 not applied: Address already in use"),
            "{refused}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn many_peers_go_and_come_in_one_apply() {
        let all: Vec<_> = (0..3000u32)
            .map(|i| {
                let mut key = [0u8; 32];
                // Past byte 0, which the clamping cuts.
                key[1..5].copy_from_slice(&i.to_le_bytes());
                PeerConfig {
                    public: PrivateKey::from_random(key).public_key(),
                    ..peer(9, &format!("10.{}.{}.0/24", i / 256, i % 256))
                }
            })
            .collect();
        let mut t = Tunnel::new(PrivateKey::from_random([1; 32]), all[..2000].to_vec());
        let done = apply(&mut t, all[1000..].to_vec());
        assert_eq!((done.added, done.removed, done.changed), (1000, 1000, 0));
        assert_eq!(t.peer_count(), 2000);
        let have: HashSet<PublicKey> = t.peers().map(|(c, _, _)| c.public).collect();
        assert!(!have.contains(&all[999].public) && have.contains(&all[1000].public));
        assert!(have.contains(&all[2999].public));
    }
}
