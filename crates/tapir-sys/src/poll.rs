//! Waiting on several descriptors at once.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Waits up to `timeout` until any of `fds` is readable; returns which are.
/// A signal ends the wait early with nothing readable (check for shutdown).
pub fn readable<const N: usize>(
    fds: [BorrowedFd<'_>; N],
    timeout: Duration,
) -> io::Result<[bool; N]> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // The descriptors are borrowed for the duration of the call.
    if let Err(e) = crate::raw::poll(&mut pfds, ms) {
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok([false; N])
        } else {
            Err(e)
        };
    }
    Ok(pfds.map(|p| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0))
}

/// `timeout` in whole milliseconds for poll, rounded up (a deadline under a
/// millisecond away must not become a busy loop), in 64-bit arithmetic
/// (`as_micros` is 128-bit, its division a call).
pub(crate) fn ms_rounded_up(timeout: Duration) -> libc::c_int {
    let ms = timeout
        .as_secs()
        .saturating_mul(1000)
        .saturating_add(u64::from(timeout.subsec_nanos().div_ceil(1_000_000)));
    libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
}

/// A reusable set of descriptors to wait on, each for reading and/or
/// writing; allocated once and refilled every turn of a loop, or, made
/// with [`PollSet::kept`], built once and kept by the kernel.
#[derive(Debug, Default)]
pub struct PollSet {
    fds: Vec<libc::pollfd>,
    /// With [`PollSet::kept`]: the epoll instance that holds the entries
    /// (each by its position), and room for what a wait reports.
    epoll: Option<(OwnedFd, Vec<libc::epoll_event>)>,
}

impl PollSet {
    /// An empty set, passed whole to `poll(2)` at each wait: for a set
    /// that changes between waits.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty set that the kernel keeps between waits (epoll): for one
    /// built once and waited on many times, such as a packet loop's. Each
    /// `poll(2)` enters every descriptor's wait queue and leaves it again;
    /// an epoll wait does neither (a ping through a tunnel measured 0.6 µs
    /// less CPU pinned to one CPU). A kernel without epoll, or one that
    /// refuses a descriptor, leaves the set to `poll(2)`, as [`new`] makes.
    ///
    /// Its descriptors must stay open while they are in it: epoll drops a
    /// closed one silently, where poll reports it (`POLLNVAL`).
    ///
    /// [`new`]: PollSet::new
    pub fn kept() -> Self {
        // SAFETY: epoll_create1 takes no pointers.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        Self {
            fds: Vec::new(),
            // SAFETY: a descriptor just created and owned by nobody else.
            epoll: (fd >= 0).then(|| (unsafe { OwnedFd::from_raw_fd(fd) }, Vec::new())),
        }
    }

    /// Whether the kernel keeps the set (see [`PollSet::kept`]).
    pub fn is_kept(&self) -> bool {
        self.epoll.is_some()
    }

    /// Empties the set, keeping its memory.
    pub fn clear(&mut self) {
        for i in 0..self.fds.len() {
            self.set_ignored(i, true);
        }
        self.fds.clear();
    }

    /// Adds `fd`, waited on for reading and/or writing; returns its position.
    pub fn add(&mut self, fd: BorrowedFd<'_>, read: bool, write: bool) -> usize {
        let mut events = 0;
        if read {
            events |= libc::POLLIN;
        }
        if write {
            events |= libc::POLLOUT;
        }
        self.fds.push(libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        });
        let i = self.fds.len() - 1;
        if !self.register(i, libc::EPOLL_CTL_ADD) {
            self.epoll = None;
        }
        i
    }

    /// Entry `i` into the kernel's set (`EPOLL_CTL_ADD`) or out of it
    /// (`EPOLL_CTL_DEL`); whether the kernel took it (always, without one).
    fn register(&mut self, i: usize, op: libc::c_int) -> bool {
        let (Some((ep, _)), Some(p)) = (&self.epoll, self.fds.get(i)) else {
            return true;
        };
        // POLLIN and POLLOUT are EPOLLIN and EPOLLOUT.
        let mut ev = libc::epoll_event {
            events: p.events as u32,
            u64: i as u64,
        };
        // SAFETY: ev is a live local the kernel reads (ADD) or ignores (DEL).
        unsafe { libc::epoll_ctl(ep.as_raw_fd(), op, p.fd, &mut ev) == 0 }
    }

    /// Whether the set has no entries.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// Leaves entry `i` out of the waits (`true`) or puts it back
    /// (`false`), keeping its place: poll skips negative descriptors, so a
    /// left-out entry's descriptor is kept complemented.
    pub fn set_ignored(&mut self, i: usize, ignored: bool) {
        let Some(p) = self.fds.get_mut(i) else {
            return;
        };
        if (p.fd < 0) == ignored {
            return;
        }
        if ignored {
            self.register(i, libc::EPOLL_CTL_DEL);
            self.fds[i].fd = !self.fds[i].fd;
        } else {
            self.fds[i].fd = !self.fds[i].fd;
            if !self.register(i, libc::EPOLL_CTL_ADD) {
                self.epoll = None;
            }
        }
    }

    /// Waits up to `timeout` (rounded up to a millisecond, so that a
    /// deadline is never polled for in a busy loop) for any descriptor to be
    /// ready. A signal ends the wait early with nothing ready.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        for p in &mut self.fds {
            p.revents = 0;
        }
        let ms = ms_rounded_up(timeout);
        let r = match &mut self.epoll {
            Some((ep, events)) => {
                events.resize(
                    self.fds.len().max(1),
                    libc::epoll_event { events: 0, u64: 0 },
                );
                let r = crate::raw::epoll_wait(ep.as_fd(), events, ms);
                for e in &events[..*r.as_ref().unwrap_or(&0)] {
                    if let Some(p) = self.fds.get_mut(e.u64 as usize) {
                        p.revents = e.events as libc::c_short;
                    }
                }
                r
            }
            // A descriptor closed meanwhile only yields POLLNVAL.
            None => crate::raw::poll(&mut self.fds, ms),
        };
        match r {
            Err(e) if e.kind() != io::ErrorKind::Interrupted => Err(e),
            _ => Ok(()),
        }
    }

    /// Whether entry `i` is readable (or has an error or hang-up to read).
    pub fn readable(&self, i: usize) -> bool {
        self.fds
            .get(i)
            .is_some_and(|p| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0)
    }

    /// Whether entry `i` is writable (or has an error to collect).
    pub fn writable(&self, i: usize) -> bool {
        self.fds
            .get(i)
            .is_some_and(|p| p.revents & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn an_ignored_entry_keeps_its_place_and_reports_nothing_until_put_back() {
        for mut set in [PollSet::new(), PollSet::kept()] {
            let kept = set.is_kept();
            let (r, mut w) = std::io::pipe().unwrap();
            let (idle, _keep) = std::io::pipe().unwrap();
            w.write_all(b"x").unwrap();
            let quiet = set.add(idle.as_fd(), true, false);
            let ready = set.add(r.as_fd(), true, false);
            set.wait(Duration::ZERO).unwrap();
            assert!(set.readable(ready) && !set.readable(quiet));
            set.set_ignored(ready, true);
            set.set_ignored(ready, true); // twice: still left out, not restored
            set.wait(Duration::ZERO).unwrap();
            assert!(!set.readable(ready), "left out (kept: {kept})");
            set.set_ignored(ready, false);
            set.wait(Duration::ZERO).unwrap();
            assert!(set.readable(ready), "back in its place (kept: {kept})");
            assert_eq!(set.fds[ready].fd, r.as_raw_fd());
            // Emptied and built again, the set reports the new entries only.
            set.clear();
            let now_idle = set.add(r.as_fd(), false, true);
            let (r2, mut w2) = std::io::pipe().unwrap();
            let now_ready = set.add(r2.as_fd(), true, false);
            w2.write_all(b"y").unwrap();
            set.wait(Duration::from_millis(100)).unwrap();
            assert!(
                set.readable(now_ready) && !set.writable(now_idle),
                "kept: {kept}"
            );
            assert_eq!(set.is_kept(), kept);
        }
    }

    #[test]
    fn a_kept_set_waits_on_the_kernels_copy_and_reports_reads_and_writes() {
        let mut set = PollSet::kept();
        assert!(set.is_kept(), "epoll is in every kernel tapir runs on");
        let (r, mut w) = std::io::pipe().unwrap();
        let rd = set.add(r.as_fd(), true, false);
        let wr = set.add(w.as_fd(), false, true);
        // Nothing to read yet: the wait times out with only the write end ready.
        set.wait(Duration::from_millis(1)).unwrap();
        assert!(!set.readable(rd) && set.writable(wr));
        w.write_all(b"x").unwrap();
        set.wait(Duration::ZERO).unwrap();
        assert!(set.readable(rd));
        // Read dry: level-triggered, as poll, so it stops reporting.
        let mut buf = [0u8; 4];
        std::io::Read::read(&mut &r, &mut buf).unwrap();
        set.wait(Duration::ZERO).unwrap();
        assert!(!set.readable(rd));
    }

    #[test]
    fn a_descriptor_the_kernel_will_not_keep_leaves_the_set_to_poll() {
        // epoll refuses the same descriptor twice; poll takes it.
        let (r, mut w) = std::io::pipe().unwrap();
        let mut set = PollSet::kept();
        let first = set.add(r.as_fd(), true, false);
        let second = set.add(r.as_fd(), true, false);
        assert!(!set.is_kept());
        w.write_all(b"x").unwrap();
        set.wait(Duration::ZERO).unwrap();
        assert!(set.readable(first) && set.readable(second));
    }
}
