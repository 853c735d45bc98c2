//! Waiting on several descriptors at once.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
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
/// writing; allocated once and refilled every turn of a loop.
#[derive(Debug, Default)]
pub struct PollSet {
    fds: Vec<libc::pollfd>,
}

impl PollSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Empties the set, keeping its memory.
    pub fn clear(&mut self) {
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
        self.fds.len() - 1
    }

    /// Whether the set has no entries.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// Leaves entry `i` out of the waits (`true`) or puts it back
    /// (`false`), keeping its place: poll skips negative descriptors, so a
    /// left-out entry's descriptor is kept complemented.
    pub fn set_ignored(&mut self, i: usize, ignored: bool) {
        if let Some(p) = self.fds.get_mut(i) {
            if (p.fd < 0) != ignored {
                p.fd = !p.fd;
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
        // A descriptor closed meanwhile only yields POLLNVAL.
        match crate::raw::poll(&mut self.fds, ms) {
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
        let (r, mut w) = std::io::pipe().unwrap();
        let (idle, _keep) = std::io::pipe().unwrap();
        w.write_all(b"x").unwrap();
        let mut set = PollSet::new();
        let quiet = set.add(idle.as_fd(), true, false);
        let ready = set.add(r.as_fd(), true, false);
        set.wait(Duration::ZERO).unwrap();
        assert!(set.readable(ready) && !set.readable(quiet));
        set.set_ignored(ready, true);
        set.set_ignored(ready, true); // twice: still left out, not restored
        set.wait(Duration::ZERO).unwrap();
        assert!(!set.readable(ready), "left out");
        set.set_ignored(ready, false);
        set.wait(Duration::ZERO).unwrap();
        assert!(set.readable(ready), "back in its place");
        assert_eq!(set.fds[ready].fd, r.as_raw_fd());
    }
}
