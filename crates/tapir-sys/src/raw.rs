//! The packet path's system calls, made directly rather than through glibc.
//!
//! In a process with more than one thread (a tunnel has its packet threads
//! and a control thread) glibc wraps every blocking call (`read`, `write`,
//! `poll`, `epoll_wait`, `recvmmsg`, `sendmmsg`) in a pthread cancellation
//! point: two calls that switch the thread's cancel state around the system
//! call, and the result goes through `errno` in thread-local storage. tapir
//! never cancels a thread. Measured with callgrind on a ping through a tunnel
//! (`bench/instructions.sh`), calling directly saved about 330 of the
//! 3,800-4,600 instructions each end then ran for a ping outside the
//! cipher, and 0.5 µs of CPU a ping (both ends, pinned to one CPU). `rustix`,
//! which makes such calls directly, has no `recvmmsg` or `sendmmsg`
//! (rustix issue 1156), so the few the packet path needs are here: one
//! `syscall` instruction each, on x86_64 and aarch64; elsewhere through
//! `libc::syscall`.
//!
//! A call interrupted by a signal fails with `EINTR`, as through glibc.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

/// System call `nr` with six arguments; the kernel's result, which is
/// `-errno` on failure.
///
/// # Safety
/// The arguments must be what system call `nr` expects: pointers the
/// kernel reads or writes must be valid for the lengths passed.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn syscall6(nr: libc::c_long, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the caller passes what the call expects (see above); the
    // `syscall` instruction clobbers rcx and r11 only, and uses no stack.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            in("r9") a[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// As on x86_64, with `svc 0`.
///
/// # Safety
/// As on x86_64.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
unsafe fn syscall6(nr: libc::c_long, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the caller passes what the call expects; `svc 0` preserves
    // every register but x0, and uses no stack.
    unsafe {
        std::arch::asm!(
            "svc 0",
            in("x8") nr,
            inlateout("x0") a[0] as isize => ret,
            in("x1") a[1],
            in("x2") a[2],
            in("x3") a[3],
            in("x4") a[4],
            in("x5") a[5],
            options(nostack),
        );
    }
    ret
}

/// Elsewhere, through glibc's (or musl's) generic `syscall`.
///
/// # Safety
/// As on x86_64.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
#[inline(always)]
unsafe fn syscall6(nr: libc::c_long, a: [usize; 6]) -> isize {
    // SAFETY: as on x86_64; `syscall` passes the arguments on unchanged.
    let rc = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
    if rc < 0 {
        -(io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO) as isize)
    } else {
        rc as isize
    }
}

/// The kernel's result as a `Result`: a count, or the errno of a failure.
#[inline(always)]
fn result(rc: isize) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::from_raw_os_error(-rc as i32))
    } else {
        Ok(rc as usize)
    }
}

/// `read(2)` into `buf`.
#[inline]
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    let a = [
        fd.as_raw_fd() as usize,
        buf.as_mut_ptr() as usize,
        buf.len(),
        0,
        0,
        0,
    ];
    // SAFETY: the kernel writes at most buf.len() bytes into buf, a live,
    // writable slice, for the call's duration.
    result(unsafe { syscall6(libc::SYS_read, a) })
}

/// `write(2)` of `buf`.
#[inline]
pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    let a = [
        fd.as_raw_fd() as usize,
        buf.as_ptr() as usize,
        buf.len(),
        0,
        0,
        0,
    ];
    // SAFETY: the kernel reads at most buf.len() bytes from a live slice.
    result(unsafe { syscall6(libc::SYS_write, a) })
}

/// `poll(2)` on `fds` for up to `ms` milliseconds (-1: no limit); how many
/// have events.
#[inline]
pub fn poll(fds: &mut [libc::pollfd], ms: libc::c_int) -> io::Result<usize> {
    // SAFETY: a live, exclusively borrowed slice of fds.len() entries.
    unsafe { poll_raw(fds.as_mut_ptr(), fds.len(), ms) }
}

/// [`poll`] on `n` entries from `fds`, for a caller that holds a pointer
/// into them besides (see `interrupt::Spare`).
///
/// # Safety
/// `fds` must point at `n` live entries that nothing else reads or
/// writes for the duration of the call but through pointers derived from
/// `fds` (a signal handler of the calling thread).
#[inline]
pub(crate) unsafe fn poll_raw(
    fds: *mut libc::pollfd,
    n: usize,
    ms: libc::c_int,
) -> io::Result<usize> {
    let a = [fds as usize, n, ms as isize as usize, 0, 0, 0];
    #[cfg(not(target_arch = "aarch64"))]
    // SAFETY: the kernel reads and writes exactly n entries from fds, live
    // for the call (the caller's promise).
    let rc = unsafe { syscall6(libc::SYS_poll, a) };
    // aarch64 has no `poll`: `ppoll` with the timeout as a timespec.
    #[cfg(target_arch = "aarch64")]
    let rc = {
        let mut ts = libc::timespec {
            tv_sec: (ms / 1000) as libc::time_t,
            tv_nsec: ((ms % 1000) * 1_000_000) as libc::c_long,
        };
        // (ppoll writes the time left back.)
        let t = if ms < 0 { 0 } else { &raw mut ts as usize };
        // SAFETY: as above; the timespec (or none) is a live local, no signal mask.
        unsafe { syscall6(libc::SYS_ppoll, [a[0], a[1], t, 0, 0, 0]) }
    };
    result(rc)
}

/// `epoll_pwait(2)` on `epfd` into `events` for up to `ms` milliseconds
/// (-1: no limit), without a signal mask; how many are filled.
#[inline]
pub fn epoll_wait(
    epfd: BorrowedFd<'_>,
    events: &mut [libc::epoll_event],
    ms: libc::c_int,
) -> io::Result<usize> {
    let a = [
        epfd.as_raw_fd() as usize,
        events.as_mut_ptr() as usize,
        events.len().min(libc::c_int::MAX as usize),
        ms as isize as usize,
        0,
        8,
    ];
    // SAFETY: the kernel writes at most events.len() entries into a live,
    // exclusively borrowed slice; a null signal mask leaves the thread's be.
    result(unsafe { syscall6(libc::SYS_epoll_pwait, a) })
}

/// `getsockopt(2)` into `buf`: returns how many bytes the kernel wrote
/// (the option's value in the machine's byte order).
pub fn getsockopt(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut len = libc::socklen_t::try_from(buf.len()).unwrap_or(libc::socklen_t::MAX);
    // SAFETY: the kernel writes at most len bytes into a live, exclusively
    // borrowed slice, and the length it wrote into a live local.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(len as usize)
}

/// Makes the descriptor `old` name what `new` names (`dup3(2)`), closing
/// what `old` named, and `new`'s own number: whoever holds `old` uses the
/// new file from their next call on. For a socket to move to another port
/// under threads that use it (a socket is bound once). An epoll set that
/// held `old` has lost it (the file it named is closed): add it again.
pub fn replace(old: BorrowedFd<'_>, new: OwnedFd) -> io::Result<()> {
    // SAFETY: both descriptors are open; dup3 keeps `old`'s number open,
    // naming another file, so what borrows it stays valid.
    if unsafe { libc::dup3(new.as_raw_fd(), old.as_raw_fd(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `send(2)` of `buf` on a connected socket: one datagram to where it is
/// connected.
#[inline]
pub fn send(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    let a = [
        fd.as_raw_fd() as usize,
        buf.as_ptr() as usize,
        buf.len(),
        0,
        0,
        0,
    ];
    // SAFETY: the kernel reads at most buf.len() bytes from a live slice;
    // no address.
    result(unsafe { syscall6(libc::SYS_sendto, a) })
}

/// `sendto(2)` of `buf` to `to`: one datagram without a header to fill.
#[inline]
pub fn sendto(fd: BorrowedFd<'_>, buf: &[u8], to: &libc::sockaddr_in6) -> io::Result<usize> {
    let a = [
        fd.as_raw_fd() as usize,
        buf.as_ptr() as usize,
        buf.len(),
        0,
        to as *const libc::sockaddr_in6 as usize,
        std::mem::size_of::<libc::sockaddr_in6>(),
    ];
    // SAFETY: the kernel reads at most buf.len() bytes from a live slice
    // and the address's size from a live sockaddr_in6.
    result(unsafe { syscall6(libc::SYS_sendto, a) })
}

/// `recv(2)` of one datagram into `buf` without blocking (a connected
/// socket: its sender is known).
#[inline]
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    let a = [
        fd.as_raw_fd() as usize,
        buf.as_mut_ptr() as usize,
        buf.len(),
        libc::MSG_DONTWAIT as usize,
        0,
        0,
    ];
    // SAFETY: the kernel writes at most buf.len() bytes into a live slice;
    // no address.
    result(unsafe { syscall6(libc::SYS_recvfrom, a) })
}

/// `recvfrom(2)` of one datagram into `buf` without blocking, its sender
/// into `from`: no header to fill and no control messages, which the
/// kernel passes over in less time than `recvmsg(2)` (a ping through a
/// tunnel measured 0.4 µs less, pinned to one CPU). Returns the length
/// and the size the kernel wrote into `from`.
#[inline]
pub fn recvfrom(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    from: &mut libc::sockaddr_in6,
) -> io::Result<(usize, usize)> {
    let mut from_len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    let a = [
        fd.as_raw_fd() as usize,
        buf.as_mut_ptr() as usize,
        buf.len(),
        libc::MSG_DONTWAIT as usize,
        from as *mut libc::sockaddr_in6 as usize,
        &mut from_len as *mut libc::socklen_t as usize,
    ];
    // SAFETY: the kernel writes at most buf.len() bytes into a live slice,
    // at most from_len bytes into a live sockaddr_in6, and from_len itself.
    let n = result(unsafe { syscall6(libc::SYS_recvfrom, a) })?;
    Ok((n, from_len as usize))
}

/// `sendmsg(2)` of the message at `hdr` (one datagram with its control
/// messages).
///
/// # Safety
/// `hdr` points at a live header whose buffers, address and control
/// buffer are valid for reading for the lengths it gives.
#[inline]
pub unsafe fn sendmsg(fd: BorrowedFd<'_>, hdr: *const libc::msghdr) -> io::Result<usize> {
    let a = [fd.as_raw_fd() as usize, hdr as usize, 0, 0, 0, 0];
    // SAFETY: the caller's promise above.
    result(unsafe { syscall6(libc::SYS_sendmsg, a) })
}

/// `recvmsg(2)` into the header at `hdr`, without blocking.
///
/// # Safety
/// `hdr` points at a live header whose buffers, address and control
/// buffer are valid for writing for the lengths it gives, and unaliased
/// for the call.
#[inline]
pub unsafe fn recvmsg(fd: BorrowedFd<'_>, hdr: *mut libc::msghdr) -> io::Result<usize> {
    let a = [
        fd.as_raw_fd() as usize,
        hdr as usize,
        libc::MSG_DONTWAIT as usize,
        0,
        0,
        0,
    ];
    // SAFETY: the caller's promise above.
    result(unsafe { syscall6(libc::SYS_recvmsg, a) })
}

/// `recvmmsg(2)` into the `n` headers at `hdrs`, without a timeout.
///
/// # Safety
/// `hdrs` points at `n` live headers whose buffers, addresses and control
/// buffers are valid for writing for the lengths they give, and unaliased
/// for the call.
#[inline]
pub unsafe fn recvmmsg(
    fd: BorrowedFd<'_>,
    hdrs: *mut libc::mmsghdr,
    n: usize,
    flags: libc::c_int,
) -> io::Result<usize> {
    // SAFETY: the caller's promise above; no timeout (a null fifth argument).
    unsafe { mmsg(libc::SYS_recvmmsg, fd, hdrs, n, flags) }
}

/// `sendmmsg(2)` of the `n` headers at `hdrs`.
///
/// # Safety
/// `hdrs` points at `n` live headers whose buffers, addresses and control
/// buffers are valid for reading for the lengths they give; the kernel
/// writes only each header's `msg_len`.
#[inline]
pub unsafe fn sendmmsg(
    fd: BorrowedFd<'_>,
    hdrs: *mut libc::mmsghdr,
    n: usize,
    flags: libc::c_int,
) -> io::Result<usize> {
    // SAFETY: the caller's promise above (sendmmsg has no fifth argument).
    unsafe { mmsg(libc::SYS_sendmmsg, fd, hdrs, n, flags) }
}

/// `recvmmsg` or `sendmmsg` (`nr`) on `n` headers at `hdrs`.
///
/// # Safety
/// As [`recvmmsg`] or [`sendmmsg`] say.
#[inline(always)]
unsafe fn mmsg(
    nr: libc::c_long,
    fd: BorrowedFd<'_>,
    hdrs: *mut libc::mmsghdr,
    n: usize,
    flags: libc::c_int,
) -> io::Result<usize> {
    let a = [
        fd.as_raw_fd() as usize,
        hdrs as usize,
        n,
        flags as usize,
        0,
        0,
    ];
    // SAFETY: the callers' promise.
    result(unsafe { syscall6(nr, a) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn calls_return_counts_and_errnos_as_glibc_does() {
        let (r, w) = std::io::pipe().unwrap();
        assert_eq!(write(w.as_fd(), b"tapir").unwrap(), 5);
        let mut fds = [libc::pollfd {
            fd: r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        assert_eq!(poll(&mut fds, 1000).unwrap(), 1);
        assert_ne!(fds[0].revents & libc::POLLIN, 0);
        let mut buf = [0u8; 16];
        assert_eq!(read(r.as_fd(), &mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"tapir");
        // Nothing more: a zero timeout finds nothing ready.
        assert_eq!(poll(&mut fds, 0).unwrap(), 0);
        // A write to a read end fails with EBADF, as write(2) says.
        let e = write(r.as_fd(), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
        // A read of a closed pipe's end: 0, end of file.
        drop(w);
        assert_eq!(read(r.as_fd(), &mut buf).unwrap(), 0);
    }
}
