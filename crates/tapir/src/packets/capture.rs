//! Becoming a device's reader: attach to an existing tun/tap device with the
//! flags it already has (or create a transient one), and frame what is read.
//!
//! ```text
//!   read(): [packet info, 4 bytes, if pi] [virtio-net header, 10 bytes, if vnet_hdr] [IP packet | Ethernet frame]
//! ```
//!
//! Attaching with the device's own flags matters: the tun driver takes the
//! flags of whoever attaches last, so a reader that asked for other flags
//! would silently change a persistent device for its next user.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use tapir_sys::{IfName, Mode, Netlink, TunDevice, TunError, TunOptions};
use tapir_wire::pcap::{LINKTYPE_ETHERNET, LINKTYPE_RAW, PcapWriter};
use tapir_wire::pi;

use crate::dev::DevError;

/// The bytes in front of each packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    /// A packet-information header comes first.
    pub pi: bool,
    /// Then a virtio-net header of this many bytes (0: none). The size is
    /// the device's (`TUNGETVNETHDRSZ`): 10 by default, 12 under QEMU.
    pub vnet_len: usize,
}

impl Framing {
    /// How many bytes precede the packet.
    pub fn prefix_len(self) -> usize {
        (if self.pi { pi::LEN } else { 0 }) + self.vnet_len
    }

    /// Prepares the prefix of a packet to be written back: the packet
    /// information is kept (same protocol), the virtio-net header zeroed
    /// (no offload requested).
    pub fn reset_for_write(self, prefix: &mut [u8]) {
        let start = if self.pi { pi::LEN } else { 0 };
        prefix[start..start + self.vnet_len].fill(0);
    }
}

/// An attached reader.
#[derive(Debug)]
pub struct Reader {
    /// The descriptor.
    pub dev: TunDevice,
    /// tun or tap.
    pub mode: Mode,
    /// What precedes each packet.
    pub framing: Framing,
    /// Whether we created the device (it goes away when `dev` is dropped).
    pub created: bool,
}

/// A pcap file for a reader of a `mode` device: link type RAW for tun,
/// Ethernet for tap. Create it only once the device is ours, so that a
/// refused attach does not truncate an existing file.
pub fn pcap_writer(
    path: &Path,
    mode: Mode,
    snaplen: u32,
) -> Result<PcapWriter<BufWriter<Box<dyn std::io::Write>>>, DevError> {
    // `-`: standard output, as tcpdump's `-w -` (for `| tcpdump -r -`).
    let file: Box<dyn std::io::Write> = if path == Path::new("-") {
        Box::new(std::io::stdout())
    } else {
        Box::new(create_private(path).map_err(|e| {
            DevError::Invalid(format!(
                "cannot create the pcap file {}: {e}",
                path.display()
            ))
        })?)
    };
    let linktype = match mode {
        Mode::Tun => LINKTYPE_RAW,
        Mode::Tap => LINKTYPE_ETHERNET,
    };
    PcapWriter::new(BufWriter::new(file), linktype, snaplen)
        .map_err(|e| DevError::Runtime(format!("cannot write the pcap file: {e}")))
}

/// Opens `path` to write a capture into, as root may be asked to in a
/// directory others can write to: a new file is 0600 (packets are private);
/// a symbolic link is not followed, and an existing file someone else owns
/// is not written into (they could read what it captures, or it is not
/// theirs to lose); one of ours is emptied, as tcpdump's `-w` does.
fn create_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
    // A named pipe (a live Wireshark: `mkfifo p; wireshark -k -i p`, or
    // `-w >(tcpdump -r -)`) waits for its reader, as tcpdump's -w does.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => std::io::Error::other(
                "it is a symbolic link, which a capture does not follow: give the file's own path",
            ),
            _ => e,
        })?;
    let m = f.metadata()?;
    let me = nix::unistd::geteuid().as_raw();
    // A pipe or a device (/dev/null) is written as it is: a reader set it
    // up to be written to, and there is nothing in it to lose.
    if m.file_type().is_fifo() || m.file_type().is_char_device() {
        return Ok(f);
    }
    if !m.is_file() {
        return Err(std::io::Error::other(
            "not a regular file, a pipe or a device: give a file's path, or - for standard output",
        ));
    }
    if m.uid() != me {
        return Err(std::io::Error::other(format!(
            "it belongs to uid {}, not to us (uid {me}): not written into; remove it or choose another name",
            m.uid()
        )));
    }
    f.set_len(0)?;
    Ok(f)
}

/// Waits (up to 200 ms at a time, so that `shutdown` is seen) for the next
/// packet and reads it into `buf`. `Ok(None)`: nothing yet, check shutdown and
/// call again; an error means the device is gone or broken.
pub fn next_packet(dev: &TunDevice, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
    if !dev.wait_readable(std::time::Duration::from_millis(200))? {
        return Ok(None);
    }
    match dev.read(buf) {
        Ok(n) => Ok(Some(n)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Attaches to `name`, or creates a transient device of `mode` if there is none.
pub fn attach(tun_path: &Path, name: &IfName, mode: Option<Mode>) -> Result<Reader, DevError> {
    let mut nl = Netlink::open()?;
    let existing = if name.is_template() {
        None
    } else {
        nl.link(name.as_str())?
    };
    let (options, created) = match existing {
        Some(link) => {
            let Some(info) = link.tun.as_ref().filter(|_| link.is_tun()) else {
                let kind = match &link.kind {
                    Some(k) => k.clone(),
                    None if link
                        .address
                        .as_deref()
                        .is_none_or(|a| a.iter().all(|b| *b == 0)) =>
                    {
                        "loopback or other non-Ethernet".into()
                    }
                    None => "physical".into(),
                };
                return Err(DevError::Invalid(format!(
                    "{name} is a {kind} link, not tun/tap: tapir dump and echo read tun/tap devices; to watch {name}: tcpdump -i {name}"
                )));
            };
            let Some(has) = info.mode else {
                return Err(DevError::Invalid(format!(
                    "{name}: the kernel does not report its mode (Linux before 4.15?)"
                )));
            };
            if let Some(want) = mode.filter(|m| *m != has) {
                return Err(DevError::Invalid(format!(
                    "{name} is a {has} device, not {want}: drop --mode or use another name"
                )));
            }
            // Attached beside a program that holds it, this would be one
            // more queue, and the kernel shares packets out between queues:
            // it would take that program's packets (a ping lost 3 of 4).
            let held = crate::dev::open_queues(&link);
            if info.multi_queue && held > 0 {
                return Err(DevError::Invalid(format!(
                    "{name} is open in {} ({held} queue(s)): attached beside it, this would be another queue of a multi-queue device, which takes packets from the others rather than seeing a copy. To watch its packets meanwhile: tcpdump -i {name}",
                    crate::dev::holders_named(name.as_str())
                )));
            }
            // Without CAP_NET_ADMIN, the kernel's rule: its owner and group,
            // where set, must be ours.
            if !crate::caps::has_net_admin() && !crate::dev::ours(info) {
                let me = nix::unistd::geteuid().as_raw();
                let who = |v: Option<u32>| v.map_or("none".to_string(), |n| n.to_string());
                return Err(DevError::Permission(format!(
                    "{name} belongs to user {} and group {}, and we are uid {me}: the kernel lets attach only its owner, where one is set, and a member of its group, where one is set, or root (run this with sudo; or have root give it to you: sudo tapir dev add {name} ... --user $USER)",
                    who(info.owner),
                    who(info.group)
                )));
            }
            (
                TunOptions {
                    mode: has,
                    packet_info: info.packet_info,
                    vnet_hdr: info.vnet_hdr,
                    multi_queue: info.multi_queue,
                },
                false,
            )
        }
        None => (TunOptions::new(mode.unwrap_or(Mode::Tun)), true),
    };
    if created && !crate::caps::has_net_admin() {
        // Not "one that belongs to another user": there is none.
        return Err(DevError::Permission(format!(
            "there is no device {name} here, and creating one needs CAP_NET_ADMIN: run this with sudo; or have root make it yours (sudo tapir dev add {name} --mode tun|tap --user $USER)"
        )));
    }
    let dev = TunDevice::open(tun_path, name, options).map_err(|e| match e {
        TunError::Ioctl { source, .. } if source.kind() == std::io::ErrorKind::ResourceBusy => {
            DevError::Invalid(format!(
                "{name} is already open in {}: a single-queue tun/tap device has one reader. To watch its packets meanwhile: tcpdump -i {name} (a second queue of a --multi-queue device would not see them: the kernel shares packets out between queues, it does not copy them)",
                crate::dev::holders_named(name.as_str())
            ))
        }
        other => DevError::Tun(other),
    })?;
    let vnet_len = if options.vnet_hdr {
        dev.vnet_hdr_len()?
    } else {
        0
    };
    Ok(Reader {
        mode: options.mode,
        framing: Framing {
            pi: options.packet_info,
            vnet_len,
        },
        created,
        dev,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        let f = |pi, vnet_len| Framing { pi, vnet_len };
        assert_eq!(f(false, 0).prefix_len(), 0);
        assert_eq!(f(true, 0).prefix_len(), 4);
        assert_eq!(f(false, 10).prefix_len(), 10);
        assert_eq!(f(true, 12).prefix_len(), 16);
        let mut p = [0xffu8; 16];
        f(true, 12).reset_for_write(&mut p);
        assert_eq!(&p[..4], &[0xff; 4], "packet info kept");
        assert_eq!(&p[4..], &[0; 12], "vnet header zeroed");
    }

    #[test]
    fn a_capture_file_is_private_and_never_reached_through_a_link() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = std::env::temp_dir().join(format!("tapir-capture-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let new = dir.join("new.pcap");
        create_private(&new).unwrap();
        assert_eq!(std::fs::metadata(&new).unwrap().mode() & 0o777, 0o600);
        // Ours and not empty: emptied, as tcpdump -w does.
        std::fs::write(&new, "old").unwrap();
        create_private(&new).unwrap();
        assert_eq!(std::fs::metadata(&new).unwrap().len(), 0);
        // A link planted where the capture goes: refused, its target untouched.
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let link = dir.join("link.pcap");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let e = create_private(&link).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        // A device, and a pipe with its reader (a live Wireshark).
        create_private(Path::new("/dev/null")).unwrap();
        let fifo = dir.join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(fifo).unwrap())
        };
        {
            use std::io::Write;
            let mut w = create_private(&fifo).unwrap();
            w.write_all(b"pcap").unwrap();
        }
        assert_eq!(reader.join().unwrap(), b"pcap");
        // Someone else's file (as root: the case that matters).
        if nix::unistd::geteuid().is_root() {
            let theirs = dir.join("theirs.pcap");
            std::fs::write(&theirs, "theirs").unwrap();
            std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o666)).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
            let e = create_private(&theirs).unwrap_err().to_string();
            assert!(e.contains("belongs to uid 65534"), "{e}");
            assert_eq!(std::fs::read_to_string(&theirs).unwrap(), "theirs");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
