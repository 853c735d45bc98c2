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
    Ok(pfds.map(|p| p.revents & READABLE != 0))
}

/// A timeout that never ends: a wait for it sets no timer in the kernel.
pub const FOREVER: Duration = Duration::MAX;

/// `timeout` in whole milliseconds for poll (-1 for [`FOREVER`]), rounded
/// up (a deadline under a millisecond away must not become a busy loop),
/// in 64-bit arithmetic (`as_micros` is 128-bit, its division a call).
pub(crate) fn ms_rounded_up(timeout: Duration) -> libc::c_int {
    if timeout == FOREVER {
        return -1;
    }
    let ms = timeout
        .as_secs()
        .saturating_mul(1000)
        .saturating_add(u64::from(timeout.subsec_nanos().div_ceil(1_000_000)));
    libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
}

/// What makes an entry readable: data, or an error or hang-up to read.
const READABLE: libc::c_short = libc::POLLIN | libc::POLLERR | libc::POLLHUP;
/// What makes it writable: room, or an error to collect.
const WRITABLE: libc::c_short = libc::POLLOUT | libc::POLLERR | libc::POLLHUP;

/// A reusable set of descriptors to wait on, each for reading and/or
/// writing; allocated once and refilled every turn of a loop, or, made
/// with [`PollSet::kept`], built once and kept by the kernel.
#[derive(Debug, Default)]
pub struct PollSet {
    fds: Vec<libc::pollfd>,
    /// With [`PollSet::kept`]: the epoll instance that holds the entries
    /// (each by its position), and room for what a wait reports.
    epoll: Option<(OwnedFd, Vec<libc::epoll_event>)>,
    /// What the last epoll wait reported, as a bit for each of the first
    /// 64 entries: readable, writable (entries beyond are looked up in
    /// `got` entries of the wait's room).
    readable_bits: u64,
    writable_bits: u64,
    got: usize,
    /// With [`PollSet::interruptible`]: entry 0 is the spare a signal
    /// fills (see [`crate::interrupt`]).
    spare: Option<crate::interrupt::Spare>,
}

fn poll_events(read: bool, write: bool) -> libc::c_short {
    let mut events = 0;
    if read {
        events |= libc::POLLIN;
    }
    if write {
        events |= libc::POLLOUT;
    }
    events
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
            readable_bits: 0,
            writable_bits: 0,
            got: 0,
            spare: None,
        }
    }

    /// An empty set passed whole to `poll(2)` at each wait, whose waits a
    /// signal to the calling thread ends ([`crate::interrupt::interrupt`],
    /// [`crate::interrupt::Alarm`]), also one sent before the wait began
    /// (after the previous one ended): for a loop that waits on a few
    /// descriptors, with its news and deadline told by signal rather than
    /// by descriptors of their own (see [`crate::interrupt`] for why). To
    /// be waited on by the thread that made it.
    pub fn interruptible() -> io::Result<Self> {
        crate::interrupt::this_thread()?;
        Ok(Self {
            fds: vec![crate::interrupt::Spare::entry()],
            spare: Some(crate::interrupt::Spare::new()),
            ..Self::default()
        })
    }

    /// Whether a signal ends its waits (see [`PollSet::interruptible`]).
    pub fn is_interruptible(&self) -> bool {
        self.spare.is_some()
    }

    /// Entries before the caller's: the spare of an interruptible set.
    fn first(&self) -> usize {
        usize::from(self.spare.is_some())
    }

    /// Whether the kernel keeps the set (see [`PollSet::kept`]).
    pub fn is_kept(&self) -> bool {
        self.epoll.is_some()
    }

    /// Empties the set, keeping its memory.
    pub fn clear(&mut self) {
        // A kept set takes its entries out of the kernel's; a polled one
        // (uapi's, a poll fallback) has nothing to undo.
        if self.epoll.is_some() {
            for i in 0..self.fds.len() {
                self.set_ignored(i, true);
            }
        }
        self.fds.truncate(self.first());
        (self.readable_bits, self.writable_bits, self.got) = (0, 0, 0);
    }

    /// Adds `fd`, waited on for reading and/or writing; returns its position.
    pub fn add(&mut self, fd: BorrowedFd<'_>, read: bool, write: bool) -> usize {
        self.fds.push(libc::pollfd {
            fd: fd.as_raw_fd(),
            events: poll_events(read, write),
            revents: 0,
        });
        let i = self.fds.len() - 1;
        if !self.register(i, libc::EPOLL_CTL_ADD) {
            self.epoll = None;
        }
        if let Some((_, events)) = &mut self.epoll {
            events.resize(i + 1, libc::epoll_event { events: 0, u64: 0 });
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

    /// Puts `fd` in entry `i`, one left out of the waits
    /// ([`PollSet::set_ignored`]): a place reused, where a set that only
    /// grew would be built again (every entry out of the kernel's set and
    /// in again) to stay small.
    pub fn reuse(&mut self, i: usize, fd: BorrowedFd<'_>, read: bool, write: bool) {
        let Some(p) = self.fds.get_mut(i) else {
            return;
        };
        debug_assert!(p.fd < 0, "entry {i} is in use");
        *p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: poll_events(read, write),
            revents: 0,
        };
        if !self.register(i, libc::EPOLL_CTL_ADD) {
            self.epoll = None;
        }
    }

    /// Changes what entry `i` is waited for (`EPOLL_CTL_MOD`).
    pub fn modify(&mut self, i: usize, read: bool, write: bool) {
        let Some(p) = self.fds.get_mut(i) else {
            return;
        };
        p.events = poll_events(read, write);
        if p.fd >= 0 && !self.register(i, libc::EPOLL_CTL_MOD) {
            self.epoll = None;
        }
    }

    /// How many entries it has, left-out ones included.
    pub fn len(&self) -> usize {
        self.fds.len() - self.first()
    }

    /// Whether the set has no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        let ms = ms_rounded_up(timeout);
        let r = match &mut self.epoll {
            Some((ep, events)) => {
                if events.is_empty() {
                    // Nothing to wait on but the timeout: epoll wants room for one.
                    events.push(libc::epoll_event { events: 0, u64: 0 });
                }
                let r = crate::raw::epoll_wait(ep.as_fd(), events, ms);
                self.got = *r.as_ref().unwrap_or(&0);
                (self.readable_bits, self.writable_bits) = (0, 0);
                for e in &events[..self.got] {
                    let (i, ev) = (e.u64, e.events as libc::c_short);
                    if i < 64 {
                        self.readable_bits |= u64::from(ev & READABLE != 0) << i;
                        self.writable_bits |= u64::from(ev & WRITABLE != 0) << i;
                    }
                }
                r
            }
            None => {
                for p in &mut self.fds {
                    p.revents = 0;
                }
                // A descriptor closed meanwhile only yields POLLNVAL.
                match &mut self.spare {
                    Some(spare) => spare.wait(&mut self.fds, ms),
                    None => crate::raw::poll(&mut self.fds, ms),
                }
            }
        };
        match r {
            Err(e) if e.kind() != io::ErrorKind::Interrupted => Err(e),
            _ => Ok(()),
        }
    }

    /// Whether entry `i` is readable (or has an error or hang-up to read).
    #[inline]
    pub fn readable(&self, i: usize) -> bool {
        match (&self.epoll, i < 64) {
            (Some(_), true) => self.readable_bits >> i & 1 != 0,
            _ => self.ready(i) & READABLE != 0,
        }
    }

    /// Whether entry `i` is writable (or has an error to collect).
    #[inline]
    pub fn writable(&self, i: usize) -> bool {
        match (&self.epoll, i < 64) {
            (Some(_), true) => self.writable_bits >> i & 1 != 0,
            _ => self.ready(i) & WRITABLE != 0,
        }
    }

    /// What the last wait reported for entry `i` (the `POLL*` bits, which
    /// are the `EPOLL*` bits).
    fn ready(&self, i: usize) -> libc::c_short {
        match &self.epoll {
            Some((_, events)) => events[..self.got]
                .iter()
                .find(|e| e.u64 == i as u64)
                .map_or(0, |e| e.events as libc::c_short),
            None => self.fds.get(i).map_or(0, |p| p.revents),
        }
    }
}

/// A timer's setting that fires once, at `at` (`now` is the time now),
/// for `timerfd_settime` and `timer_settime`: never early
/// (`std::time::Instant` is `CLOCK_MONOTONIC`, and the timer runs from
/// when it is set, after `now`), and a deadline already passed fires in a
/// nanosecond (a zero value would disarm it).
pub(crate) fn once_at(at: std::time::Instant, now: std::time::Instant) -> libc::itimerspec {
    let d = at
        .saturating_duration_since(now)
        .max(Duration::from_nanos(1));
    libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: d.subsec_nanos().into(),
        },
    }
}

/// A deadline kept by the kernel (a timerfd) for a loop that waits on a
/// kept [`PollSet`]: put in the set once, it makes the set readable when
/// the deadline passes, and the loop waits with no timeout ([`FOREVER`]).
///
/// A wait with a timeout arms and cancels a high-resolution timer in the
/// kernel each time, and reads the clock to do so; a loop whose deadline
/// rarely changes (a tunnel's timers, at most a second apart) pays for
/// that at every packet. This one is set again only when the deadline
/// comes sooner than the one it holds, or after it fired: a later one
/// costs a wake-up at the earlier time, at which the loop finds nothing
/// due and sets it again.
#[derive(Debug)]
pub struct Deadline {
    fd: OwnedFd,
    /// When it fires, as set (`None`: not set).
    set: Option<std::time::Instant>,
}

impl Deadline {
    /// A deadline not yet set.
    pub fn new() -> io::Result<Self> {
        // SAFETY: timerfd_create takes no pointers.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: a descriptor just created and owned by nobody else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            set: None,
        })
    }

    /// The descriptor to wait on: readable once the deadline has passed.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Makes sure the descriptor is readable by `at` (`now` is the time
    /// now): sets it unless it is set for `at` or sooner already. Never
    /// early: `std::time::Instant` is `CLOCK_MONOTONIC`, the timer's clock,
    /// and the timer runs from when it is set, after `now`.
    pub fn ensure(&mut self, at: std::time::Instant, now: std::time::Instant) -> io::Result<()> {
        if self.set.is_some_and(|set| set <= at) {
            return Ok(());
        }
        let spec = crate::poll::once_at(at, now);
        // SAFETY: spec is a live local the kernel reads; no old value asked for.
        if unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) }
            != 0
        {
            return Err(io::Error::last_os_error());
        }
        self.set = Some(at);
        Ok(())
    }

    /// After a wait found the descriptor readable: takes the expiry, so
    /// that it is not reported again, and forgets the deadline.
    pub fn fired(&mut self) {
        let mut n = [0u8; 8];
        // Nothing to read (a deadline set again since) is fine: EAGAIN.
        let _ = crate::raw::read(self.fd.as_fd(), &mut n);
        self.set = None;
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
    fn an_interruptible_set_counts_and_reports_only_its_callers_entries_and_a_signal_ends_it() {
        let mut set = PollSet::interruptible().unwrap();
        assert!(set.is_interruptible() && !set.is_kept());
        assert!(set.is_empty());
        let (r, mut w) = std::io::pipe().unwrap();
        let (idle, _keep) = std::io::pipe().unwrap();
        let quiet = set.add(idle.as_fd(), true, false);
        let ready = set.add(r.as_fd(), true, false);
        assert_eq!(set.len(), 2);
        w.write_all(b"x").unwrap();
        set.wait(FOREVER).unwrap();
        assert!(set.readable(ready) && !set.readable(quiet));
        set.clear();
        assert!(set.is_empty());
        let idle_at = set.add(idle.as_fd(), true, false);
        let tid = crate::interrupt::this_thread().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(30));
                crate::interrupt::interrupt(tid);
            });
            set.wait(FOREVER).unwrap();
        });
        assert!(!set.readable(idle_at));
    }

    #[test]
    fn a_kept_set_waits_on_the_kernels_copy_and_reports_reads_and_writes() {
        let mut set = PollSet::kept();
        assert!(set.is_kept(), "epoll is in every kernel tapir runs on");
        // Empty, it waits out its timeout.
        set.wait(Duration::from_millis(1)).unwrap();
        let (r, mut w) = std::io::pipe().unwrap();
        let rd = set.add(r.as_fd(), true, false);
        let wr = set.add(w.as_fd(), false, true);
        // Nothing to read yet: the wait times out with only the write end ready.
        set.wait(Duration::from_millis(1)).unwrap();
        assert!(!set.readable(rd) && set.writable(wr));
        w.write_all(b"xy").unwrap();
        set.wait(Duration::ZERO).unwrap();
        assert!(set.readable(rd));
        // Level-triggered, as poll: what is left unread is reported again
        // (a packet loop may leave the rest of a device's queue to its next
        // wait), and read dry, it is not.
        let mut buf = [0u8; 4];
        std::io::Read::read(&mut &r, &mut buf[..1]).unwrap();
        set.wait(Duration::ZERO).unwrap();
        assert!(set.readable(rd), "the rest still reported");
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

    #[test]
    fn a_deadline_wakes_a_kept_set_when_it_passes_and_keeps_the_sooner_one() {
        let mut set = PollSet::kept();
        let mut d = Deadline::new().unwrap();
        let i = set.add(d.fd(), true, false);
        let t0 = std::time::Instant::now();
        // A later deadline than the one set is kept as it is: it wakes at the sooner.
        d.ensure(t0 + Duration::from_millis(30), t0).unwrap();
        d.ensure(t0 + Duration::from_secs(60), t0).unwrap();
        set.wait(Duration::ZERO).unwrap();
        assert!(!set.readable(i), "not before its time");
        set.wait(FOREVER).unwrap();
        assert!(set.readable(i));
        assert!(t0.elapsed() >= Duration::from_millis(30), "never early");
        assert!(t0.elapsed() < Duration::from_secs(30), "the sooner one");
        d.fired();
        set.wait(Duration::ZERO).unwrap();
        assert!(!set.readable(i), "taken: not reported again");
        // A sooner one replaces a later one; a passed one fires at once.
        let t1 = std::time::Instant::now();
        d.ensure(t1 + Duration::from_secs(60), t1).unwrap();
        d.ensure(t1 - Duration::from_millis(1), t1).unwrap();
        set.wait(Duration::from_secs(5)).unwrap();
        assert!(set.readable(i) && t1.elapsed() < Duration::from_secs(5));
    }
}
