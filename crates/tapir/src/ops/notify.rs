//! systemd's readiness protocol (`sd_notify`): datagrams to the socket in
//! `NOTIFY_SOCKET`, when systemd started us with `Type=notify`. Without it,
//! nothing happens.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (`READY=1`, `RELOADING=1`, `STOPPING=1`, `STATUS=...`)
/// to systemd, if it listens; says whether it was sent.
pub fn send(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())
        }
        None => SocketAddr::from_pathname(&path),
    };
    let Ok(addr) = addr else {
        return false;
    };
    UnixDatagram::unbound()
        .and_then(|s| s.send_to_addr(state.as_bytes(), &addr))
        .is_ok()
}

/// `RELOADING=1` with the monotonic time systemd 253 and later ask for.
pub fn reloading() -> bool {
    let usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000
    });
    send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"))
}
