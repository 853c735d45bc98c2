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

/// Takes an exclusive lock on `file` (`flock`), waiting for whoever holds
/// it; it goes with the descriptor.
pub fn lock(file: &std::fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: flock on a descriptor `file` keeps open; no memory passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
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
