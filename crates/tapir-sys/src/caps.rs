//! Giving up capabilities: after a tunnel is set up, the process keeps
//! `CAP_NET_ADMIN` (routes, marks) and `CAP_NET_BIND_SERVICE` (a port under
//! 1024 given later by `wg set` or a reload, as root's WireGuard takes it)
//! alone, in its effective, permitted and bounding sets, and can never gain
//! more (`no_new_privs`), while it parses what arrives from the network for
//! the rest of its life.
//!
//! ```text
//!   PR_SET_NO_NEW_PRIVS ─▶ PR_CAPBSET_DROP (every cap but those two) ─▶ capset(those two, where held)
//! ```
//! Capabilities are per thread: call this before spawning the threads that
//! should run with it (they inherit the calling thread's sets).

use std::io;

/// `CAP_NET_ADMIN`.
pub const CAP_NET_ADMIN: u32 = 12;
/// `CAP_NET_BIND_SERVICE`.
pub const CAP_NET_BIND_SERVICE: u32 = 10;
/// What a running tunnel keeps.
const KEPT: [u32; 2] = [CAP_NET_ADMIN, CAP_NET_BIND_SERVICE];
/// `_LINUX_CAPABILITY_VERSION_3`.
const CAP_V3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The highest capability number this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Drops every capability but the network's two (if `keep`) from the
/// bounding set, so that nothing can gain them back. Takes CAP_SETPCAP:
/// without it (EPERM) the set stays as it is, and the effective and
/// permitted sets are what hold the process back.
fn shrink_bounding_set(keep: bool) -> io::Result<()> {
    for cap in 0..=last_cap() {
        if keep && KEPT.contains(&cap) {
            continue;
        }
        // SAFETY: prctl with integer arguments only. EINVAL for a
        // capability this kernel lacks is harmless.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINVAL) => {}
                Some(libc::EPERM) => break,
                _ => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("prctl(PR_CAPBSET_DROP): {e}"),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Keeps `CAP_NET_ADMIN` and `CAP_NET_BIND_SERVICE` only, those of the two
/// it holds (or nothing, if `keep` is false); returns the first failing step.
pub fn keep_only_network(keep: bool) -> io::Result<()> {
    let fail = |op: &str| {
        let e = io::Error::last_os_error();
        io::Error::new(e.kind(), format!("{op}: {e}"))
    };
    // SAFETY: prctl with integer arguments only; no memory is passed.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(fail("prctl(PR_SET_NO_NEW_PRIVS)"));
    }
    shrink_bounding_set(keep)?;
    let named = |op: &str, e: io::Error| io::Error::new(e.kind(), format!("{op}: {e}"));
    let mut data = [CapData::default(); 2];
    capability_call(libc::SYS_capget, &mut data).map_err(|e| named("capget", e))?;
    // Only what is permitted now can stay (capset refuses more).
    let wanted: u32 = if keep {
        KEPT.iter().map(|c| 1u32 << c).sum()
    } else {
        0
    };
    let held = data[0].permitted & wanted;
    data = [CapData::default(); 2];
    data[0].effective = held;
    data[0].permitted = held;
    capability_call(libc::SYS_capset, &mut data).map_err(|e| named("capset", e))
}

/// `capget` or `capset` (`nr`) of this thread's sets, in `data`, with a v3
/// header.
fn capability_call(nr: libc::c_long, data: &mut [CapData; 2]) -> io::Result<()> {
    let mut header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    // SAFETY: capget writes, capset reads, a v3 header and two data
    // structs, both live locals with the kernel's layout (repr(C), three
    // u32 each).
    let rc = unsafe { libc::syscall(nr, &mut header as *mut CapHeader, data.as_mut_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Runs the process as `uid` and `gid` (no supplementary groups) from now
/// on, keeping `CAP_NET_ADMIN` and `CAP_NET_BIND_SERVICE` alone, as
/// [`keep_only_network`] does for root. Call it before spawning threads: credentials are per thread, and
/// only libc's wrappers carry them to every thread of the process.
pub fn become_user(uid: u32, gid: u32) -> io::Result<()> {
    let fail = |op: &str| {
        let e = io::Error::last_os_error();
        io::Error::new(e.kind(), format!("{op}: {e}"))
    };
    // While CAP_SETPCAP is still ours (the change of uid empties the
    // effective set, and with it the right to shrink the bounding set).
    shrink_bounding_set(true)?;
    // SAFETY: prctl with integer arguments only: the permitted set
    // survives the change of uid below.
    if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) } != 0 {
        return Err(fail("prctl(PR_SET_KEEPCAPS)"));
    }
    // SAFETY: an empty list: no memory is read.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(fail("setgroups"));
    }
    // SAFETY: integer arguments only.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(fail("setresgid"));
    }
    // SAFETY: integer arguments only.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(fail("setresuid"));
    }
    // The effective set was emptied by the change of uid: raise the two
    // again from the permitted set, and drop everything else.
    keep_only_network(true)?;
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    Ok(())
}
