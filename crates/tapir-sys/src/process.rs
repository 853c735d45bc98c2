//! What a process hands down to the programs it starts.

use std::io;

/// `CLOSE_RANGE_CLOEXEC` (linux/close_range.h).
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// Marks every descriptor from 3 up close-on-exec, so that a program
/// started from here (a daemon) inherits only its stdio, not whatever the
/// caller's shell or parent left open. Linux 5.11 (`close_range`).
pub fn cloexec_beyond_stdio() -> io::Result<()> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on
    // descriptors of this process; it reads and writes no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Restores SIGPIPE's default action (the Rust runtime ignores it), as a
/// command whose output goes to a pipe wants: `tapir status | head` ends
/// quietly when head has read enough, as `ip` and `wg` do, instead of
/// failing on EPIPE at the next write. Not for a process that writes to
/// sockets peers may close (the tunnel): one closed would end it.
pub fn default_sigpipe() {
    // SAFETY: signal with a constant signal and the default disposition;
    // no handler of ours is involved.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The fields of a `/proc/PID/stat` file (or a task's) after the command
/// name, the state first, then ppid, pgrp...: the name may hold spaces and
/// parentheses of its own.
pub fn stat_fields(path: &std::path::Path) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(path).ok()?;
    let (_, rest) = s.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// How long process `pid` has run: its start in `/proc/PID/stat` (clock
/// ticks after boot) against `/proc/uptime`.
pub fn age(pid: i32) -> Option<std::time::Duration> {
    let fields = stat_fields(std::path::Path::new(&format!("/proc/{pid}/stat")))?;
    let start: u64 = fields.get(19)?.parse().ok()?;
    // SAFETY: sysconf with a constant name; no memory passed.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = u64::try_from(ticks).ok().filter(|&t| t > 0)?;
    let up: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let started = start as f64 / ticks as f64;
    Some(std::time::Duration::from_secs_f64((up - started).max(0.0)))
}

/// The processes there are: the numbered entries of `/proc`.
pub fn pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Takes an exclusive lock on `file` (`flock`) if no one holds it:
/// `Ok(false)` if someone does.
pub fn try_lock(file: &std::fs::File) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor `file` keeps open; no memory passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) | Some(libc::EINTR) => Ok(false),
        _ => Err(e),
    }
}

/// Makes the program `cmd` starts get SIGTERM when this thread ends (the
/// process killed, even by SIGKILL), as a helper process must not outlive
/// the one that started it and would clean it up (`PR_SET_PDEATHSIG`). A
/// parent gone before the child set it makes the start fail.
pub fn dies_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: getpid is async-signal-safe and reads no memory of ours.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the child between fork and exec; it calls
    // only prctl and getppid (async-signal-safe), allocates nothing and
    // touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGTERM as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}
