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
