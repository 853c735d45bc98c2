//! Network namespaces: moving the calling thread into one.
//!
//! `setns(2)` changes the namespace of the calling *thread* only, so the safe
//! way to work in another namespace is a thread of its own (see `netlab`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Moves the calling thread into the network namespace that `path` names
/// (`/run/netns/NAME`, `/proc/PID/ns/net`).
pub fn enter(path: &Path) -> io::Result<()> {
    let file = File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?;
    // SAFETY: setns takes a namespace descriptor that is open for the call's
    // duration and a constant; it touches no memory of ours.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("setns({}, CLONE_NEWNET): {e}", path.display()),
        ));
    }
    Ok(())
}

/// A network namespace's identity: the inode of its nsfs file, as `lsns`
/// and `ip netns identify` compare them. It stays the namespace's for as
/// long as the namespace lives.
pub fn id_of(path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// The calling thread's network namespace (threads can differ: see [`enter`]).
pub fn current() -> io::Result<u64> {
    id_of(Path::new("/proc/thread-self/ns/net"))
}

/// The network namespace of process `pid` (needs the right to inspect it:
/// root, or the same user with no more capabilities).
pub fn of_pid(pid: i32) -> io::Result<u64> {
    id_of(Path::new(&format!("/proc/{pid}/ns/net")))
}

/// The host's namespace: the first process's, or where that process may
/// not be inspected (some init systems are not dumpable), the kernel
/// threads' (pid 2, kthreadd, always lives in the initial namespace).
pub fn initial() -> io::Result<u64> {
    id_of(Path::new("/proc/1/ns/net")).or_else(|_| id_of(Path::new("/proc/2/ns/net")))
}

/// The name `ip netns` knows namespace `id` by: the entry of `/run/netns`
/// bound to it, if there is one.
pub fn name_of(id: u64) -> Option<String> {
    std::fs::read_dir("/run/netns")
        .ok()?
        .flatten()
        .find(|e| id_of(&e.path()).is_ok_and(|i| i == id))
        .and_then(|e| e.file_name().into_string().ok())
}

/// Whether the client of the Unix stream `fd`, which we accepted, lives in
/// the caller's network namespace. The kernel creates an accepted socket
/// in the namespace of the socket that connected, so its namespace cookie
/// (`SO_NETNS_COOKIE`, Linux 5.14) is the client's. `None` when the kernel
/// cannot tell.
pub fn peer_is_local(fd: std::os::fd::BorrowedFd<'_>) -> Option<bool> {
    let theirs = netns_cookie(fd)?;
    Some(cookie().ok()? == theirs)
}

/// The calling thread's network namespace's cookie (`SO_NETNS_COOKIE`,
/// Linux 5.14): unlike its inode, which the kernel gives again to a later
/// namespace once this one is gone, never the same for two namespaces
/// while the machine runs.
pub fn cookie() -> io::Result<u64> {
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    // SAFETY: socket takes constants and returns a new descriptor or -1.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a descriptor just returned to us and owned by nobody else.
    let probe = unsafe { OwnedFd::from_raw_fd(raw) };
    netns_cookie(probe.as_fd()).ok_or_else(|| io::Error::other("SO_NETNS_COOKIE unsupported"))
}

/// Whether the calling thread's user namespace owns its network namespace
/// (or is an ancestor of the one that does): whether its capabilities,
/// CAP_NET_ADMIN among them, count there. `unshare -Ur` (or a rootless
/// container without a network namespace of its own) gives every
/// capability in a new user namespace that owns nothing: the kernel then
/// refuses each change with EPERM. `None` when the kernel cannot tell
/// (no `NS_GET_USERNS`, Linux 4.9).
pub fn caps_count_here() -> Option<bool> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::fs::MetadataExt;
    /// `NS_GET_USERNS` and `NS_GET_PARENT` (linux/nsfs.h): `_IO(0xb7, 1)`, `_IO(0xb7, 2)`.
    const NS_GET_USERNS: libc::c_ulong = 0xb701;
    const NS_GET_PARENT: libc::c_ulong = 0xb702;
    let ours = std::fs::metadata("/proc/thread-self/ns/user").ok()?.ino();
    let net = File::open("/proc/thread-self/ns/net").ok()?;
    // SAFETY: NS_GET_USERNS takes no argument and returns a new descriptor
    // (or -1) of the namespace's owning user namespace.
    let raw = unsafe { libc::ioctl(net.as_raw_fd(), NS_GET_USERNS) };
    if raw < 0 {
        // EPERM: its owner is outside our user namespace: not ours.
        return match io::Error::last_os_error().raw_os_error() {
            Some(libc::EPERM) => Some(false),
            _ => None,
        };
    }
    // SAFETY: raw is a descriptor just returned to us and owned by nobody else.
    let mut owner = unsafe { OwnedFd::from_raw_fd(raw) };
    // Up from the owner: ours on the way (ours owns it, or an ancestor of
    // its owner does), or EPERM past what we may see (not ours).
    for _ in 0..64 {
        if File::from(owner.try_clone().ok()?).metadata().ok()?.ino() == ours {
            return Some(true);
        }
        // SAFETY: as above, NS_GET_PARENT on a user namespace descriptor.
        let raw = unsafe { libc::ioctl(owner.as_raw_fd(), NS_GET_PARENT) };
        if raw < 0 {
            return Some(false);
        }
        // SAFETY: as above.
        owner = unsafe { OwnedFd::from_raw_fd(raw) };
    }
    Some(false)
}

/// The cookie of the network namespace that socket `fd` belongs to.
fn netns_cookie(fd: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
    let mut b = [0u8; 8];
    crate::raw::getsockopt(fd, libc::SOL_SOCKET, libc::SO_NETNS_COOKIE, &mut b).ok()?;
    Some(u64::from_ne_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn a_peer_in_our_namespace_is_local() {
        let dir = std::env::temp_dir().join(format!("tapir-diag-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let listener = UnixListener::bind(&path).unwrap();
        let client = UnixStream::connect(&path).unwrap();
        let (server, _) = listener.accept().unwrap();
        assert_eq!(peer_is_local(server.as_fd()), Some(true));
        assert_eq!(peer_is_local(client.as_fd()), Some(true));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(current().unwrap(), current().unwrap());
        assert_eq!(cookie().unwrap(), cookie().unwrap());
        // Root of the host, or any user: the namespace we are in is ours.
        assert_ne!(caps_count_here(), Some(false));
    }
}
