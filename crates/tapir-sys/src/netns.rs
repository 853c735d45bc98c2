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
    }
}
