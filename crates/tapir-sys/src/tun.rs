//! tun/tap devices through `/dev/net/tun` and its ioctls.
//!
//! ```text
//!   open(/dev/net/tun) ──TUNSETIFF(name, IFF_TUN|IFF_TAP, flags)──▶ fd bound to a device
//!        │                                                            │
//!        ├─ TUNSETOWNER / TUNSETGROUP  (who may attach later)         ├─ read(): a packet the host sent
//!        └─ TUNSETPERSIST              (device outlives the fd)       └─ write(): a packet to the host
//! ```
//!
//! There is no netlink call that creates a tun device with an owner, so this
//! is what `ip tuntap add` does too. Addresses, routes, MTU and link state are
//! netlink's business: see [`crate::netlink`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::ifname::IfName;

/// Where the kernel's tun/tap clone device normally lives.
pub const DEFAULT_TUN_PATH: &str = "/dev/net/tun";

/// Layer 3 (`tun`, IP packets) or layer 2 (`tap`, Ethernet frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// IP packets, no link-layer header (`IFF_TUN`).
    Tun,
    /// Ethernet frames (`IFF_TAP`).
    Tap,
}

impl Mode {
    /// `"tun"` or `"tap"`, as `ip tuntap` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Tun => "tun",
            Mode::Tap => "tap",
        }
    }

    fn iff(self) -> libc::c_int {
        match self {
            Mode::Tun => libc::IFF_TUN,
            Mode::Tap => libc::IFF_TAP,
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tun" => Ok(Mode::Tun),
            "tap" => Ok(Mode::Tap),
            other => Err(format!("unknown mode {other:?}: use tun or tap")),
        }
    }
}

/// The flags a tun/tap device is created or attached with. Attaching to an
/// existing device needs the same mode and `multi_queue` setting; the packet
/// information and vnet header settings are per descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TunOptions {
    /// tun or tap.
    pub mode: Mode,
    /// Prefix each packet with the 4-byte packet-information header
    /// (`IFF_NO_PI` cleared). Off by default, as with `ip tuntap`.
    pub packet_info: bool,
    /// Prefix each packet with a virtio-net header (`IFF_VNET_HDR`), which
    /// is what makes checksum and segmentation offloads possible.
    pub vnet_hdr: bool,
    /// Allow several file descriptors (queues) on one device (`IFF_MULTI_QUEUE`).
    pub multi_queue: bool,
}

impl TunOptions {
    /// Options for a plain device of `mode`: no packet info, no vnet header, one queue.
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            packet_info: false,
            vnet_hdr: false,
            multi_queue: false,
        }
    }

    fn ifr_flags(&self) -> libc::c_int {
        let mut flags = self.mode.iff();
        if !self.packet_info {
            flags |= libc::IFF_NO_PI;
        }
        if self.vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        }
        if self.multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        flags
    }

    fn from_ifr_flags(flags: libc::c_int) -> Self {
        Self {
            mode: if flags & libc::IFF_TAP != 0 {
                Mode::Tap
            } else {
                Mode::Tun
            },
            packet_info: flags & libc::IFF_NO_PI == 0,
            vnet_hdr: flags & libc::IFF_VNET_HDR != 0,
            multi_queue: flags & libc::IFF_MULTI_QUEUE != 0,
        }
    }
}

/// What the tun driver of this kernel supports (`TUNGETFEATURES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunFeatures(pub u32);

impl TunFeatures {
    /// `IFF_TUN` and `IFF_TAP`.
    pub fn tun_and_tap(self) -> bool {
        self.has(libc::IFF_TUN) && self.has(libc::IFF_TAP)
    }
    /// `IFF_MULTI_QUEUE`.
    pub fn multi_queue(self) -> bool {
        self.has(libc::IFF_MULTI_QUEUE)
    }
    /// `IFF_VNET_HDR`.
    pub fn vnet_hdr(self) -> bool {
        self.has(libc::IFF_VNET_HDR)
    }
    /// `IFF_NAPI` (the kernel can batch what we write).
    pub fn napi(self) -> bool {
        self.has(libc::IFF_NAPI)
    }
    fn has(self, flag: libc::c_int) -> bool {
        self.0 & flag as u32 != 0
    }
}

/// The offloads of `TUNSETOFFLOAD`: what the reader of a vnet-header device
/// accepts from the kernel.
pub mod offload {
    /// The reader completes partial checksums.
    pub const CSUM: u32 = libc::TUN_F_CSUM;
    /// The reader accepts IPv4 TCP super-packets.
    pub const TSO4: u32 = libc::TUN_F_TSO4;
    /// The reader accepts IPv6 TCP super-packets.
    pub const TSO6: u32 = libc::TUN_F_TSO6;
    /// The reader accepts IPv4 UDP super-packets (Linux 6.2).
    pub const USO4: u32 = libc::TUN_F_USO4;
    /// The reader accepts IPv6 UDP super-packets (Linux 6.2).
    pub const USO6: u32 = libc::TUN_F_USO6;
}

/// What to do about a clone device that is not there: the driver's own
/// node made where it belongs; for another path, the driver's first (it
/// said `mkdir -p / && mknod /nonexistent ...` alone).
fn missing_fix(path: &std::path::Path) -> String {
    if path == std::path::Path::new(DEFAULT_TUN_PATH) {
        "load the tun module (modprobe tun), create the node (mkdir -p /dev/net && mknod /dev/net/tun c 10 200), or run in a VM with CONFIG_TUN".into()
    } else {
        let mkdir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty() && *d != std::path::Path::new("/"))
            .map(|d| format!("mkdir -p {} && ", d.display()))
            .unwrap_or_default();
        format!(
            "give the tun driver's clone device, /dev/net/tun (--tun-path, TAPIR_TUN_PATH), or leave it out; or make one there (modprobe tun, then {mkdir}mknod {} c 10 200)",
            path.display()
        )
    }
}

/// A failure of the tun side, with the operation, the device and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunError {
    /// The clone device does not exist.
    #[error("{path} is missing: {fix}", path = .path.display(), fix = missing_fix(.path))]
    Missing {
        /// The path that was tried.
        path: PathBuf,
    },
    /// The path exists but is not the tun character device.
    #[error(
        "{path} is not a character device: it should be the tun clone device (c 10 200); remove it and run modprobe tun, or mknod {path} c 10 200"
    )]
    NotCharDevice {
        /// The path that was tried.
        path: PathBuf,
    },
    /// Opening the clone device failed.
    #[error("cannot open {path}: {source}{hint}", hint = open_hint(source))]
    Open {
        /// The path that was tried.
        path: PathBuf,
        /// What the kernel said.
        source: io::Error,
    },
    /// An ioctl on the device failed.
    #[error("{op} on {device}: {source}{hint}", hint = ioctl_hint(op, source))]
    Ioctl {
        /// The ioctl, e.g. `TUNSETIFF`.
        op: &'static str,
        /// The device name (or template) it was for.
        device: String,
        /// What the kernel said.
        source: io::Error,
    },
}

fn open_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => {
            " (only root may open it here: run with sudo, or change the node's mode with chmod 0666, as most distributions do)"
        }
        Some(libc::ENXIO) | Some(libc::ENODEV) => " (the tun driver is not loaded: modprobe tun)",
        _ => "",
    }
}

fn ioctl_hint(op: &str, e: &io::Error) -> &'static str {
    match (op, e.raw_os_error()) {
        ("TUNSETIFF", Some(libc::EPERM)) => {
            " (creating a device, or opening one that belongs to another user or group, needs CAP_NET_ADMIN: run with sudo; to use a device without root, have root create it persistent and owned by you: tapir dev add NAME --user YOU, or see its owner with tapir dev show NAME)"
        }
        ("TUNSETIFF", Some(libc::EBUSY)) => {
            " (the device already exists, or is already attached and not multi-queue)"
        }
        ("TUNSETIFF", Some(libc::EINVAL)) => {
            " (the device exists with another mode or flags, or the name is taken by a device that is not tun/tap)"
        }
        (_, Some(libc::EPERM)) => " (needs CAP_NET_ADMIN: run with sudo)",
        _ => "",
    }
}

/// An open tun/tap device: a file descriptor attached to one queue of it.
///
/// Dropping it detaches; a device that is not persistent disappears with its
/// last descriptor.
#[derive(Debug)]
pub struct TunDevice {
    fd: OwnedFd,
    name: IfName,
    options: TunOptions,
}

/// Opens the clone device, telling apart "missing", "not a device" and "no permission".
pub fn open_clone_device(path: &Path) -> Result<File, TunError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(TunError::Missing {
                path: path.to_owned(),
            });
        }
        Err(source) => {
            return Err(TunError::Open {
                path: path.to_owned(),
                source,
            });
        }
        Ok(meta) if !meta.file_type().is_char_device() => {
            return Err(TunError::NotCharDevice {
                path: path.to_owned(),
            });
        }
        Ok(_) => {}
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| TunError::Open {
            path: path.to_owned(),
            source,
        })
}

/// Asks the tun driver what it supports, without creating anything.
pub fn features(path: &Path) -> Result<TunFeatures, TunError> {
    let file = open_clone_device(path)?;
    let mut features: libc::c_uint = 0;
    // SAFETY: TUNGETFEATURES writes one unsigned int through the pointer, which
    // points at a live local of that type.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETFEATURES, &mut features) };
    if rc < 0 {
        return Err(TunError::Ioctl {
            op: "TUNGETFEATURES",
            device: path.display().to_string(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(TunFeatures(features))
}

impl TunDevice {
    /// Creates a new device named `name` (or from a template such as `tap%d`);
    /// fails with `EBUSY` if one by that name exists (`IFF_TUN_EXCL`), so that
    /// an existing device is never silently reused.
    ///
    /// The device is not persistent until [`TunDevice::set_persist`].
    pub fn create(path: &Path, name: &IfName, options: TunOptions) -> Result<Self, TunError> {
        Self::set_iff(path, name, options, libc::IFF_TUN_EXCL)
    }

    /// Attaches to the device `name`, creating a transient one if none exists.
    /// This is what a program that reads and writes packets does; an
    /// unprivileged user may attach to a persistent device that it owns.
    pub fn open(path: &Path, name: &IfName, options: TunOptions) -> Result<Self, TunError> {
        Self::set_iff(path, name, options, 0)
    }

    fn set_iff(
        path: &Path,
        name: &IfName,
        options: TunOptions,
        extra: libc::c_int,
    ) -> Result<Self, TunError> {
        let file = open_clone_device(path)?;
        let fd = OwnedFd::from(file);
        // SAFETY: ifreq is a plain C struct of integers and arrays; all-zero is valid.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        ifr.ifr_name = name.to_ifr_name();
        ifr.ifr_ifru.ifru_flags = (options.ifr_flags() | extra) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one struct ifreq through the
        // pointer, which points at a live, initialised local.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if rc < 0 {
            return Err(TunError::Ioctl {
                op: "TUNSETIFF",
                device: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let name = IfName::from_ifr_name(&ifr.ifr_name).map_err(|e| TunError::Ioctl {
            op: "TUNSETIFF",
            device: name.to_string(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;
        Ok(Self { fd, name, options })
    }

    /// The device's name, as the kernel completed it.
    pub fn name(&self) -> &IfName {
        &self.name
    }

    /// The options this descriptor was attached with.
    pub fn options(&self) -> TunOptions {
        self.options
    }

    /// The flags the kernel reports for this descriptor (`TUNGETIFF`),
    /// including `IFF_PERSIST`. Returns the options and whether it is persistent.
    pub fn kernel_flags(&self) -> Result<(TunOptions, bool), TunError> {
        // SAFETY: ifreq is a plain C struct of integers and arrays; all-zero is valid.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes one struct ifreq through the pointer, which
        // points at a live local.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNGETIFF, &mut ifr) };
        if rc < 0 {
            return Err(self.ioctl_error("TUNGETIFF"));
        }
        // SAFETY: after TUNGETIFF the kernel has written ifru_flags.
        let flags = libc::c_int::from(unsafe { ifr.ifr_ifru.ifru_flags }) & 0xffff;
        Ok((
            TunOptions::from_ifr_flags(flags),
            flags & libc::IFF_PERSIST != 0,
        ))
    }

    /// The device's MTU now (`SIOCGIFMTU`, by name, in this thread's
    /// network namespace). The tun descriptor does not answer that
    /// question, any socket does: a Unix one, there whatever the kernel
    /// leaves out. Three system calls, for a caller that asks now and then.
    pub fn mtu(&self) -> io::Result<u32> {
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        // SAFETY: ifreq is a plain C struct of integers and arrays; all-zero is valid.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        ifr.ifr_name = self.name.to_ifr_name();
        // SAFETY: SIOCGIFMTU reads the name and writes ifru_mtu of one
        // struct ifreq through the pointer, which points at a live local.
        let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFMTU, &mut ifr) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: after SIOCGIFMTU the kernel has written ifru_mtu.
        Ok(u32::try_from(unsafe { ifr.ifr_ifru.ifru_mtu }).unwrap_or(0))
    }

    /// The size of the virtio-net header this device uses (`TUNGETVNETHDRSZ`):
    /// 10 by default, 12 when set so (QEMU does), whether or not the device
    /// has `IFF_VNET_HDR` on.
    pub fn vnet_hdr_len(&self) -> Result<usize, TunError> {
        let mut size: libc::c_int = 0;
        // SAFETY: TUNGETVNETHDRSZ writes one int through the pointer, a live local.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNGETVNETHDRSZ, &mut size) };
        if rc < 0 {
            return Err(self.ioctl_error("TUNGETVNETHDRSZ"));
        }
        Ok(usize::try_from(size).unwrap_or(10))
    }

    /// Makes the device outlive this descriptor (`TUNSETPERSIST 1`) or not.
    pub fn set_persist(&self, persist: bool) -> Result<(), TunError> {
        self.ioctl_value(
            "TUNSETPERSIST",
            libc::TUNSETPERSIST,
            libc::c_ulong::from(persist),
        )
    }

    /// Lets user `uid` attach without CAP_NET_ADMIN (`TUNSETOWNER`).
    pub fn set_owner(&self, uid: u32) -> Result<(), TunError> {
        self.ioctl_value("TUNSETOWNER", libc::TUNSETOWNER, libc::c_ulong::from(uid))
    }

    /// Lets members of group `gid` attach without CAP_NET_ADMIN (`TUNSETGROUP`).
    pub fn set_group(&self, gid: u32) -> Result<(), TunError> {
        self.ioctl_value("TUNSETGROUP", libc::TUNSETGROUP, libc::c_ulong::from(gid))
    }

    /// Declares which offloads the reader handles (`TUNSETOFFLOAD`, see [`offload`]).
    /// Needs a vnet-header device for anything but 0.
    pub fn set_offload(&self, flags: u32) -> Result<(), TunError> {
        self.ioctl_value(
            "TUNSETOFFLOAD",
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    }

    fn ioctl_value(
        &self,
        op: &'static str,
        request: libc::Ioctl,
        value: libc::c_ulong,
    ) -> Result<(), TunError> {
        // SAFETY: these tun ioctls take their argument by value, not through
        // a pointer; the descriptor is open for as long as `self`.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), request, value) };
        if rc < 0 {
            return Err(self.ioctl_error(op));
        }
        Ok(())
    }

    fn ioctl_error(&self, op: &'static str) -> TunError {
        TunError::Ioctl {
            op,
            device: self.name.to_string(),
            source: io::Error::last_os_error(),
        }
    }

    /// Reads one packet (or frame) that the host sent into the device.
    /// `buf` should hold the MTU plus headers (packet info, vnet header,
    /// Ethernet); a longer packet is truncated by the kernel.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        crate::raw::read(self.fd.as_fd(), buf)
    }

    /// Writes one packet (or frame) into the host's network stack.
    pub fn write(&self, packet: &[u8]) -> io::Result<usize> {
        crate::raw::write(self.fd.as_fd(), packet)
    }

    /// Waits up to `timeout` for a packet to read. `Ok(false)` on timeout or
    /// when a signal interrupted the wait (so the caller can check for shutdown).
    pub fn wait_readable(&self, timeout: std::time::Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = crate::poll::ms_rounded_up(timeout);
        let rc = match crate::raw::poll(std::slice::from_mut(&mut pfd), ms) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(false),
            Err(e) => return Err(e),
        };
        if rc > 0 && pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return Err(io::Error::other(format!(
                "{}: the device went away (deleted while open?)",
                self.name
            )));
        }
        Ok(rc > 0)
    }

    /// Switches the descriptor between blocking and non-blocking reads.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        // SAFETY: F_GETFL takes no argument and only reads the descriptor's flags.
        let flags = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if nonblocking {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        // SAFETY: F_SETFL takes an int of file status flags by value.
        if unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_SETFL, flags) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsFd for TunDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifr_flags_round_trip() {
        for mode in [Mode::Tun, Mode::Tap] {
            for bits in 0..8u8 {
                let o = TunOptions {
                    mode,
                    packet_info: bits & 1 != 0,
                    vnet_hdr: bits & 2 != 0,
                    multi_queue: bits & 4 != 0,
                };
                assert_eq!(TunOptions::from_ifr_flags(o.ifr_flags()), o);
            }
        }
    }

    #[test]
    fn default_is_what_ip_tuntap_does() {
        // `ip tuntap add mode tun` sets IFF_TUN | IFF_NO_PI.
        assert_eq!(
            TunOptions::new(Mode::Tun).ifr_flags(),
            libc::IFF_TUN | libc::IFF_NO_PI
        );
        assert_eq!(
            TunOptions::new(Mode::Tap).ifr_flags(),
            libc::IFF_TAP | libc::IFF_NO_PI
        );
    }

    #[test]
    fn missing_and_not_a_device_are_told_apart() {
        let dir = std::env::temp_dir().join(format!("tapir-sys-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("tun");
        let err = open_clone_device(&missing).unwrap_err();
        assert!(matches!(err, TunError::Missing { .. }));
        assert!(err.to_string().contains("modprobe tun"), "{err}");
        let plain = dir.join("plain");
        std::fs::write(&plain, b"").unwrap();
        let err = open_clone_device(&plain).unwrap_err();
        assert!(matches!(err, TunError::NotCharDevice { .. }));
        assert!(err.to_string().contains("not a character device"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
