//! wg-quick's `SaveConfig = true`: on down, the peers as they are then
//! (those added or changed with `wg set` included, with their current
//! endpoints) are written back to the file. The `[Interface]` section is
//! kept as the user wrote it, comments included; the file keeps its owner
//! and mode (closed to group and others if it now holds a preshared key),
//! and is replaced in one rename, so a crash leaves the old or the new one.

use std::fmt::Write as _;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use tapir_proto::wg::tunnel::Tunnel;

/// The file's text up to its first `[Peer]` section.
fn interface_part(text: &str) -> &str {
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if line.trim().eq_ignore_ascii_case("[peer]") {
            break;
        }
        at += line.len();
    }
    &text[..at]
}

/// The new text: `text`'s `[Interface]` part, then the tunnel's peers,
/// each with its current endpoint (`roaming`: over UDP, where that is
/// where the peer is) or the configured one (over TCP, where it is where
/// a connection came from, a port of the moment).
pub fn render(text: &str, tunnel: &Tunnel, roaming: bool) -> String {
    let mut out = interface_part(text).trim_end().to_owned();
    out.push('\n');
    for (c, current, _) in tunnel.peers() {
        let _ = write!(out, "\n[Peer]\nPublicKey = {}\n", c.public.to_base64());
        if let Some(psk) = &c.psk {
            let _ = writeln!(out, "PresharedKey = {}", psk.to_base64());
        }
        if !c.allowed_ips.is_empty() {
            let ips: Vec<String> = c.allowed_ips.iter().map(|n| n.to_string()).collect();
            let _ = writeln!(out, "AllowedIPs = {}", ips.join(", "));
        }
        if let Some(e) = if roaming {
            current.or(c.endpoint)
        } else {
            c.endpoint
        } {
            let _ = writeln!(out, "Endpoint = {e}");
        }
        if let Some(k) = c.keepalive {
            let _ = writeln!(out, "PersistentKeepalive = {}", k.as_secs());
        }
        if let Some(r) = c.rate {
            let _ = writeln!(out, "Rate = {r}");
        }
    }
    out
}

/// Writes the tunnel's peers back to `file` (see the module's words).
pub fn save(file: &Path, tunnel: &Tunnel, roaming: bool) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("{}: {e}", file.display());
    let text = std::fs::read_to_string(file).map_err(fail)?;
    let meta = std::fs::metadata(file).map_err(fail)?;
    let new = render(&text, tunnel, roaming);
    let mut mode = meta.permissions().mode() & 0o777;
    if tunnel.peers().any(|(c, _, _)| c.psk.is_some()) {
        mode &= 0o700;
    }
    let tmp = file.with_extension(format!("tapir-save.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        std::io::Write::write_all(&mut f, new.as_bytes())?;
        f.sync_all()?;
        std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid()))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, file)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapir_proto::wg::keys::{PresharedKey, PrivateKey};
    use tapir_proto::wg::tunnel::PeerConfig;

    #[test]
    fn keeps_the_interface_as_written_and_writes_the_peers_as_they_are() {
        let peer = PrivateKey::from_random([3; 32]).public_key();
        let added = PrivateKey::from_random([4; 32]).public_key();
        let mut t = Tunnel::new(
            PrivateKey::from_random([1; 32]),
            vec![PeerConfig {
                public: peer,
                psk: None,
                endpoint: Some("192.0.2.1:51820".parse().unwrap()),
                allowed_ips: vec!["10.0.0.2/32".parse().unwrap()],
                keepalive: Some(std::time::Duration::from_secs(25)),
                rate: None,
            }],
        );
        // As `wg set` would: a second peer, with a preshared key.
        t.add_peer(PeerConfig {
            public: added,
            psk: Some(PresharedKey::from_random([9; 32])),
            endpoint: None,
            allowed_ips: vec![
                "10.0.0.3/32".parse().unwrap(),
                "fd00::3/128".parse().unwrap(),
            ],
            keepalive: None,
            rate: Some(20_000_000),
        });
        let text = "[Interface]\n# mine\nPrivateKeyFile = /etc/tapir/k\nAddress = 10.0.0.1/24\nSaveConfig = true\n\n[peer]\nPublicKey = old\n";
        let out = render(text, &t, true);
        assert!(out.starts_with("[Interface]\n# mine\nPrivateKeyFile = /etc/tapir/k\nAddress = 10.0.0.1/24\nSaveConfig = true\n\n[Peer]\n"), "{out}");
        assert!(!out.contains("PublicKey = old"));
        assert!(out.contains(&format!(
            "[Peer]\nPublicKey = {}\nAllowedIPs = 10.0.0.2/32\nEndpoint = 192.0.2.1:51820\nPersistentKeepalive = 25\n",
            peer.to_base64()
        )));
        assert!(out.contains(&format!(
            "[Peer]\nPublicKey = {}\nPresharedKey = {}\nAllowedIPs = 10.0.0.3/32, fd00::3/128\nRate = 20000000\n",
            added.to_base64(),
            PresharedKey::from_random([9; 32]).to_base64()
        )));
        // What it writes, tapir reads back.
        let back = crate::config::parse(
            Path::new("/etc/tapir/tp0.conf"),
            tapir_sys::IfName::new("tp0").unwrap(),
            &out.replace(
                "PrivateKeyFile = /etc/tapir/k",
                &format!(
                    "PrivateKey = {}",
                    PrivateKey::from_random([1; 32]).to_base64()
                ),
            ),
            0o600,
        )
        .unwrap();
        assert_eq!(back.peers.len(), 2);
        assert_eq!(back.peers[1].rate, Some(20_000_000));
    }

    #[test]
    fn a_peer_heard_from_elsewhere_is_saved_there_over_udp_only() {
        use std::time::{Duration, Instant};
        let (server, client) = (
            PrivateKey::from_random([5; 32]),
            PrivateKey::from_random([6; 32]),
        );
        let peer = |k: &PrivateKey, endpoint: Option<&str>| PeerConfig {
            public: k.public_key(),
            psk: None,
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            allowed_ips: vec!["10.0.0.2/32".parse().unwrap()],
            keepalive: None,
            rate: None,
        };
        // The server knows the client at a configured address; the client
        // handshakes from another (over TCP: its connection's port).
        let mut s = Tunnel::new(server.clone(), vec![peer(&client, Some("192.0.2.7:51820"))]);
        let mut c = Tunnel::new(client, vec![peer(&server, Some("192.0.2.1:51820"))]);
        let (now, wall) = (Instant::now(), Duration::from_secs(1_700_000_000));
        let mut rng = crate::tunnel::OsRandom::new().unwrap();
        let mut buf = vec![0u8; 2048];
        buf[16..36].copy_from_slice(&[
            0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ]);
        c.encapsulate(now, wall, &mut rng, &mut buf, 20);
        let (_, n) = c.poll_transmit(now, &mut buf).expect("an initiation");
        let from = "192.0.2.7:40123".parse().unwrap();
        s.decapsulate(now, wall, &mut rng, from, &mut buf, n);
        assert_eq!(s.peers().next().unwrap().1, Some(from));
        let text = "[Interface]\nListenPort = 51820\n";
        assert!(render(text, &s, true).contains("Endpoint = 192.0.2.7:40123\n"));
        assert!(render(text, &s, false).contains("Endpoint = 192.0.2.7:51820\n"));
    }
}
