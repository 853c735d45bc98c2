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

/// The new text: `text`'s `[Interface]` part, then the tunnel's peers.
pub fn render(text: &str, tunnel: &Tunnel) -> String {
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
        if let Some(e) = current.or(c.endpoint) {
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
pub fn save(file: &Path, tunnel: &Tunnel) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("{}: {e}", file.display());
    let text = std::fs::read_to_string(file).map_err(fail)?;
    let meta = std::fs::metadata(file).map_err(fail)?;
    let new = render(&text, tunnel);
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
        let out = render(text, &t);
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
}
