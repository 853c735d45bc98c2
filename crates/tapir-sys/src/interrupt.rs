//! Waking a thread that sleeps in `poll(2)` on descriptors of its work
//! alone: a signal sent to that thread (`tgkill`), for news from other
//! threads, and a timer that sends it at a deadline (`timer_create` with
//! `SIGEV_THREAD_ID`), for the thread's own timers.
//!
//! ```text
//!   other threads ── tgkill(SIGNAL) ──┐
//!   Alarm (kernel timer) ─ SIGNAL ────┼─▶ handler: count it; while armed, the
//!                                     │   wait's spare entry ◀─ an always-readable fd
//!   packet thread: arm ─ looked at news since the count? ─ poll(device, socket, spare)
//! ```
//!
//! Why not a descriptor for the news and one for the timer in an epoll
//! set: on the 2-core development machine an epoll wait cost a ping
//! through a tunnel 0.8 µs (pinned to one CPU) over `poll(2)` on the two
//! descriptors that carry packets, and each further descriptor in a
//! `poll(2)` 0.35 µs or more; a signal costs nothing until it is sent,
//! which news and timers rarely are.
//!
//! Every signal-based wake-up has a race: the signal comes after the
//! thread looked for news and before it sleeps. `ppoll(2)`'s signal mask
//! closes it at a cost on every wait (measured 0.5 µs a ping); here the
//! handler closes it instead. Each handled signal is counted, so a wait
//! that starts after one does not sleep; and while a thread is between its
//! look at the count and the system call, the handler puts an
//! always-readable descriptor in the wait's spare entry (otherwise `-1`,
//! which `poll(2)` skips), so the call, when it starts, returns at once.
//!
//! The signal is `SIGURG` (ignored by default, and sent by the kernel
//! only to a socket's owner set with `F_SETOWN`, which tapir sets only
//! to have it sent: [`on_arrival`]),
//! handled with `SA_RESTART`: other system calls of the thread go on as
//! if it had not come; `poll(2)` never restarts, so a sleeping wait ends.
//! A program that handles `SIGURG` itself must not use this module.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU64, Ordering, compiler_fence};
use std::time::Instant;

/// The signal that interrupts.
pub const SIGNAL: libc::c_int = libc::SIGURG;

/// An eventfd that is always readable (its count is 1, and nobody reads
/// it): what the handler puts in an armed wait's spare entry.
static READY: AtomicI32 = AtomicI32::new(-1);

thread_local! {
    /// Signals handled on this thread (wrapping). Atomic, with the handler
    /// of this thread its only other user: what it writes is then
    /// ordered for the thread's own reads by the compiler fences alone.
    static COUNT: AtomicU64 = const { AtomicU64::new(0) };
    /// While a wait is armed: its spare entry's descriptor.
    static ARMED: AtomicPtr<libc::c_int> = const { AtomicPtr::new(std::ptr::null_mut()) };
}

extern "C" fn on_signal(_: libc::c_int) {
    // Async-signal-safe: thread-locals with constant initialisers and no
    // destructor are plain memory; nothing here calls out or sets errno.
    let _ = COUNT.try_with(|c| c.fetch_add(1, Ordering::Relaxed));
    let _ = ARMED.try_with(|a| {
        let p = a.load(Ordering::Relaxed);
        if !p.is_null() {
            // SAFETY: an armed pointer is to a live entry of the wait this
            // thread is about to make (see `Spare::wait`), disarmed before
            // that wait's set can move or go.
            unsafe { AtomicI32::from_ptr(p) }
                .store(READY.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    });
}

/// The handler and the ready descriptor, made once per process; the
/// errno if either could not be.
fn install() -> io::Result<()> {
    static DONE: OnceLock<Result<(), i32>> = OnceLock::new();
    let r = DONE.get_or_init(|| {
        // SAFETY: eventfd takes no pointers.
        let fd = unsafe { libc::eventfd(1, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(errno());
        }
        // Kept open for the life of the process.
        READY.store(fd, Ordering::Relaxed);
        // SAFETY: a zeroed sigaction is a valid one (no flags, empty mask),
        // filled in before use; the handler is an `extern "C"` function of
        // one int that only touches its own thread's memory.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(SIGNAL, &sa, std::ptr::null_mut()) != 0 {
                return Err(errno());
            }
        }
        Ok(())
    });
    r.map_err(io::Error::from_raw_os_error)
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Makes the calling thread one that [`interrupt`] and [`Alarm`] can wake
/// (the handler installed, the signal not blocked here); returns its
/// thread id, for [`interrupt`].
pub fn this_thread() -> io::Result<i32> {
    install()?;
    // SAFETY: a zeroed sigset filled by sigemptyset/sigaddset, read by
    // pthread_sigmask; no old mask asked for.
    let rc = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, SIGNAL);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: gettid takes nothing and cannot fail.
    Ok(unsafe { libc::gettid() })
}

/// Interrupts thread `tid` of this process (from [`this_thread`]); whether
/// the signal went (not if the thread is gone). A thread id can be taken
/// again by a new thread once its own has ended: the caller stops using
/// it first (a spurious signal to another thread of tapir's is harmless).
pub fn interrupt(tid: i32) -> bool {
    // SAFETY: tgkill takes no pointers.
    unsafe { libc::tgkill(libc::getpid(), tid, SIGNAL) == 0 }
}

/// `F_SETSIG`, `F_SETOWN_EX` and `F_OWNER_TID` (asm-generic/fcntl.h; not
/// in the libc crate for this target).
const F_SETSIG: libc::c_int = 10;
const F_SETOWN_EX: libc::c_int = 15;
const F_OWNER_TID: libc::c_int = 0;

/// `struct f_owner_ex`.
#[repr(C)]
struct OwnerEx {
    kind: libc::c_int,
    pid: libc::pid_t,
}

/// Makes what arrives on socket `fd` interrupt thread `tid` of this
/// process (from [`this_thread`]) as [`interrupt`] does: `O_ASYNC`, with
/// [`SIGNAL`] sent to that thread alone; or no longer (`None`). For a
/// socket the thread does not poll, where arrivals are rare.
pub fn on_arrival(fd: BorrowedFd<'_>, tid: Option<i32>) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl on a live descriptor, with ints by value and a live
    // f_owner_ex read by the kernel.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = match tid {
            Some(tid) => {
                let owner = OwnerEx {
                    kind: F_OWNER_TID,
                    pid: tid,
                };
                if libc::fcntl(fd, F_SETOWN_EX, &owner as *const OwnerEx) < 0
                    || libc::fcntl(fd, F_SETSIG, SIGNAL) < 0
                {
                    return Err(io::Error::last_os_error());
                }
                flags | libc::O_ASYNC
            }
            None => flags & !libc::O_ASYNC,
        };
        if libc::fcntl(fd, libc::F_SETFL, flags) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Signals handled on the calling thread so far.
pub fn count() -> u64 {
    COUNT.with(|c| c.load(Ordering::Relaxed))
}

/// A `poll(2)` set with a spare entry that a signal to its thread fills
/// (see the module's doc): waited on by one thread, the one that made it.
#[derive(Debug)]
pub struct Spare {
    /// The count when the last wait ended (what was looked at since).
    seen: u64,
    /// Not `Send`: the count and the arming are the thread's that made it.
    _thread: std::marker::PhantomData<*const ()>,
}

impl Spare {
    /// For the calling thread, which must be one [`this_thread`] set up.
    pub fn new() -> Self {
        Self {
            seen: count(),
            _thread: std::marker::PhantomData,
        }
    }

    /// The entry to put first in the set.
    pub fn entry() -> libc::pollfd {
        libc::pollfd {
            fd: -1,
            events: libc::POLLIN,
            revents: 0,
        }
    }

    /// `poll(2)` on `fds`, whose first entry is the spare, for up to `ms`
    /// milliseconds (-1: no limit), or, if a signal came since the last
    /// wait ended, without waiting (what is ready is reported). A signal
    /// after this returns counts for the next.
    pub fn wait(&mut self, fds: &mut [libc::pollfd], ms: libc::c_int) -> io::Result<usize> {
        let Some(first) = fds.first_mut() else {
            return Ok(0);
        };
        *first = Self::entry();
        let base = fds.as_mut_ptr();
        // SAFETY: `base` points at the first of fds.len() live entries,
        // exclusively borrowed for this call; the pointer to its `fd` is
        // taken from it, and the kernel is given the same base.
        let spare = unsafe { &raw mut (*base).fd };
        ARMED.with(|a| a.store(spare, Ordering::Relaxed));
        compiler_fence(Ordering::SeqCst);
        // A signal since the last wait: no sleep, but a look at what is
        // ready (the packets are not left for another turn).
        let ms = if count() != self.seen { 0 } else { ms };
        // SAFETY: the kernel reads and writes fds.len() entries from
        // `base`, live for the call; the handler writes only the spare's
        // descriptor, through a pointer derived from it.
        let r = unsafe { crate::raw::poll_raw(base, fds.len(), ms) };
        compiler_fence(Ordering::SeqCst);
        ARMED.with(|a| a.store(std::ptr::null_mut(), Ordering::Relaxed));
        compiler_fence(Ordering::SeqCst);
        self.seen = count();
        match r {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            r => r,
        }
    }
}

impl Default for Spare {
    fn default() -> Self {
        Self::new()
    }
}

/// A deadline that interrupts the thread that made it when it passes (a
/// POSIX timer sending [`SIGNAL`] to that thread alone). Set again only
/// when the deadline comes sooner than the one it holds, or after it
/// passed, as [`crate::poll::Deadline`] is.
#[derive(Debug)]
pub struct Alarm {
    id: libc::timer_t,
    /// When it fires, as set (`None`: not set).
    set: Option<Instant>,
}

impl Alarm {
    /// An alarm for the calling thread, which must be one [`this_thread`]
    /// set up; not yet set.
    pub fn new() -> io::Result<Self> {
        let tid = this_thread()?;
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: a zeroed sigevent is valid; the fields for a signal to
        // one thread are filled in; the kernel writes the id into a live
        // local.
        let rc = unsafe {
            let mut ev: libc::sigevent = std::mem::zeroed();
            ev.sigev_notify = libc::SIGEV_THREAD_ID;
            ev.sigev_signo = SIGNAL;
            ev.sigev_notify_thread_id = tid;
            libc::timer_create(libc::CLOCK_MONOTONIC, &mut ev, &mut id)
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { id, set: None })
    }

    /// Makes sure the thread is interrupted by `at` (`now` is the time
    /// now): sets the timer unless it is set for `at` or sooner and has not
    /// passed. Never early: `Instant` is `CLOCK_MONOTONIC`, the timer's
    /// clock, and the timer runs from when it is set, after `now`.
    pub fn ensure(&mut self, at: Instant, now: Instant) -> io::Result<()> {
        if self.set.is_some_and(|set| set <= at && set > now) {
            return Ok(());
        }
        let spec = crate::poll::once_at(at, now);
        // SAFETY: a timer this value made; spec is a live local the kernel
        // reads; no old value asked for.
        if unsafe { libc::timer_settime(self.id, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        self.set = Some(at);
        Ok(())
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        // SAFETY: a timer this value made, deleted once.
        unsafe { libc::timer_delete(self.id) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
    use std::time::Duration;

    fn entry(fd: BorrowedFd<'_>) -> libc::pollfd {
        libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }
    }

    #[test]
    fn a_signal_from_another_thread_ends_a_wait_that_has_no_timeout() {
        let (r, _w) = std::io::pipe().unwrap();
        let tid = this_thread().unwrap();
        let mut spare = Spare::new();
        let mut fds = [Spare::entry(), entry(r.as_fd())];
        let t = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                assert!(interrupt(tid));
            });
            assert_eq!(spare.wait(&mut fds, -1).unwrap(), 0);
        });
        assert!(t.elapsed() >= Duration::from_millis(40));
        // Taken: the next wait sleeps out its timeout.
        let t = Instant::now();
        spare.wait(&mut fds, 30).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(25));
    }

    #[test]
    fn a_signal_before_the_wait_is_not_lost() {
        // The race the spare closes: the signal comes after the thread last
        // looked (here: at once, to itself) and before it polls.
        let (r, _w) = std::io::pipe().unwrap();
        let tid = this_thread().unwrap();
        let mut spare = Spare::new();
        let mut fds = [Spare::entry(), entry(r.as_fd())];
        assert!(interrupt(tid));
        let t = Instant::now();
        assert_eq!(spare.wait(&mut fds, 5_000).unwrap(), 0);
        assert!(t.elapsed() < Duration::from_secs(1));
        // And while armed: the handler fills the spare, and poll returns.
        let ready = READY.load(Ordering::Relaxed);
        let mut armed = [Spare::entry(), entry(r.as_fd())];
        ARMED.with(|a| a.store(&raw mut armed[0].fd, Ordering::Relaxed));
        assert!(interrupt(tid));
        ARMED.with(|a| a.store(std::ptr::null_mut(), Ordering::Relaxed));
        assert_eq!(armed[0].fd, ready);
        let n = crate::raw::poll(&mut armed, 5_000).unwrap();
        assert_eq!((n, armed[0].revents & libc::POLLIN), (1, libc::POLLIN));
        spare.wait(&mut fds, 0).unwrap();
    }

    #[test]
    fn an_alarm_ends_the_wait_at_its_deadline_and_a_later_one_keeps_the_sooner() {
        let (r, _w) = std::io::pipe().unwrap();
        let mut alarm = Alarm::new().unwrap();
        let mut spare = Spare::new();
        let mut fds = [Spare::entry(), entry(r.as_fd())];
        let t = Instant::now();
        alarm.ensure(t + Duration::from_millis(60), t).unwrap();
        // Later: the sooner one stands.
        alarm.ensure(t + Duration::from_secs(60), t).unwrap();
        spare.wait(&mut fds, 5_000).unwrap();
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(55) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        // Passed: set again, even for a later time.
        let now = Instant::now();
        alarm.ensure(now + Duration::from_millis(30), now).unwrap();
        spare.wait(&mut fds, 5_000).unwrap();
        assert!(
            now.elapsed() >= Duration::from_millis(25) && now.elapsed() < Duration::from_secs(2)
        );
    }

    #[test]
    fn other_calls_of_the_thread_go_on_through_a_signal() {
        // SA_RESTART: a blocking read is not cut short.
        let (mut r, mut w) = std::io::pipe().unwrap();
        let tid = this_thread().unwrap();
        std::thread::scope(|s| {
            s.spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                interrupt(tid);
                std::thread::sleep(Duration::from_millis(30));
                std::io::Write::write_all(&mut w, b"x").unwrap();
            });
            let mut b = [0u8; 1];
            std::io::Read::read_exact(&mut r, &mut b).unwrap();
        });
    }
}
