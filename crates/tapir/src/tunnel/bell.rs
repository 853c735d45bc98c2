//! A wake-up for a thread that sleeps in `poll`: it polls the bell with its
//! other descriptors, and whoever has news rings it. The tunnel's threads
//! sleep until there is something to do (a packet, a request, a timer, a
//! signal), never on a fixed tick, so an idle tunnel does not wake the CPU.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::Duration;

/// Both ends of a non-blocking socket pair: rung at one, polled at the
/// other; or, while a thread has said it listens
/// ([`Bell::interrupts_this_thread`]), a signal to that thread, which
/// then needs no descriptor for it (see `tapir_sys::interrupt`).
#[derive(Debug)]
pub struct Bell {
    polled: UnixStream,
    rung: UnixStream,
    /// Rings so far.
    rings: AtomicU64,
    /// The thread a ring interrupts (0: none; the socket is written).
    thread: AtomicI32,
}

impl Bell {
    /// A bell nobody has rung yet.
    pub fn new() -> io::Result<Self> {
        let (polled, rung) = UnixStream::pair()?;
        polled.set_nonblocking(true)?;
        rung.set_nonblocking(true)?;
        Ok(Self {
            polled,
            rung,
            rings: AtomicU64::new(0),
            thread: AtomicI32::new(0),
        })
    }

    /// Wakes the thread polling [`Bell::fd`], or the one it interrupts. A
    /// full socket already says "look again", so it never blocks.
    pub fn ring(&self) {
        // Counted before the look at the thread, which counts after it
        // says it listens: one of the two sees the other (SeqCst).
        self.rings.fetch_add(1, Ordering::SeqCst);
        match self.thread.load(Ordering::SeqCst) {
            0 => {
                let _ = (&self.rung).write(&[1]);
            }
            tid => {
                tapir_sys::interrupt::interrupt(tid);
            }
        }
    }

    /// Rings so far: a thread that is interrupted looks for news when
    /// this has moved.
    pub fn rings(&self) -> u64 {
        self.rings.load(Ordering::SeqCst)
    }

    /// Rings interrupt the calling thread from now on (its waits made
    /// with `tapir_sys::poll::PollSet::interruptible`), until the guard
    /// goes; the socket is no longer written meanwhile. What was rung
    /// before shows in [`Bell::rings`].
    pub fn interrupts_this_thread(&self) -> io::Result<Interrupting<'_>> {
        let tid = tapir_sys::interrupt::this_thread()?;
        self.thread.store(tid, Ordering::SeqCst);
        Ok(Interrupting(self))
    }

    /// What to poll for reading.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.polled.as_fd()
    }

    /// Takes the rings so far (after a wake-up, before looking for news).
    pub fn drain(&self) {
        let mut buf = [0u8; 64];
        while matches!((&self.polled).read(&mut buf), Ok(n) if n > 0) {}
    }

    /// A second ringing end, for a signal handler to write to
    /// (`signal_hook::low_level::pipe`). It writes the socket only: not
    /// for a bell whose thread listens ([`Bell::interrupts_this_thread`]).
    pub fn ringer(&self) -> io::Result<UnixStream> {
        self.rung.try_clone()
    }

    /// Sleeps until the bell rings (or a signal interrupts), then drains it.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<()> {
        tapir_sys::poll::readable([self.fd()], timeout.unwrap_or(FOREVER))?;
        self.drain();
        Ok(())
    }
}

/// While it lives, a bell's rings interrupt the thread that made it.
pub struct Interrupting<'a>(&'a Bell);

impl Drop for Interrupting<'_> {
    fn drop(&mut self) {
        self.0.thread.store(0, Ordering::SeqCst);
    }
}

/// "No timeout" for `poll`: the longest wait it takes (about 24 days).
pub const FOREVER: Duration = Duration::from_millis(i32::MAX as u64);

/// Rings `bell` on each of `signals` (from the signal handler, as a write
/// to a socket; the handlers already installed stay). The registrations
/// end with the returned guard.
pub fn ring_on_signals(bell: &Bell, signals: &[i32]) -> io::Result<SignalRings> {
    let mut ids = Vec::new();
    for &s in signals {
        match signal_hook::low_level::pipe::register(s, bell.ringer()?) {
            Ok(id) => ids.push(id),
            Err(e) => {
                drop(SignalRings(ids));
                return Err(e);
            }
        }
    }
    Ok(SignalRings(ids))
}

/// Registrations made by [`ring_on_signals`]; removed on drop.
pub struct SignalRings(Vec<signal_hook::SigId>);

impl Drop for SignalRings {
    fn drop(&mut self) {
        for id in self.0.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_ring_wakes_the_waiter_and_is_taken_once() {
        let bell = Bell::new().unwrap();
        std::thread::scope(|s| {
            let t = Instant::now();
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                bell.ring();
            });
            bell.wait(None).unwrap();
            assert!(t.elapsed() >= Duration::from_millis(40));
        });
        // Drained: a second wait sleeps until its timeout.
        let t = Instant::now();
        bell.wait(Some(Duration::from_millis(30))).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(25));
    }

    #[test]
    fn many_rings_never_block_the_ringer() {
        let bell = Bell::new().unwrap();
        for _ in 0..100_000 {
            bell.ring();
        }
        bell.wait(None).unwrap();
    }

    #[test]
    fn rings_interrupt_the_thread_that_listens_and_write_the_socket_after() {
        let bell = Bell::new().unwrap();
        bell.ring();
        let mut set = tapir_sys::poll::PollSet::interruptible().unwrap();
        let listening = bell.interrupts_this_thread().unwrap();
        // Rung before: counted, and in the socket.
        assert_eq!(bell.rings(), 1);
        bell.drain();
        let (idle, _w) = std::io::pipe().unwrap();
        set.add(idle.as_fd(), true, false);
        std::thread::scope(|s| {
            let t = Instant::now();
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                bell.ring();
            });
            set.wait(tapir_sys::poll::FOREVER).unwrap();
            assert!(t.elapsed() >= Duration::from_millis(40));
        });
        assert_eq!(bell.rings(), 2);
        // Not written: a wait on the socket sleeps.
        assert!(!tapir_sys::poll::readable([bell.fd()], Duration::ZERO).unwrap()[0]);
        drop(listening);
        bell.ring();
        assert!(tapir_sys::poll::readable([bell.fd()], Duration::ZERO).unwrap()[0]);
    }

    #[test]
    fn a_signal_rings_it() {
        let bell = Bell::new().unwrap();
        // SIGWINCH: ignored by default, harmless to the test process.
        let rings = ring_on_signals(&bell, &[signal_hook::consts::SIGWINCH]).unwrap();
        signal_hook::low_level::raise(signal_hook::consts::SIGWINCH).unwrap();
        let t = Instant::now();
        bell.wait(Some(Duration::from_secs(5))).unwrap();
        assert!(t.elapsed() < Duration::from_secs(4));
        drop(rings);
        signal_hook::low_level::raise(signal_hook::consts::SIGWINCH).unwrap();
        let t = Instant::now();
        bell.wait(Some(Duration::from_millis(30))).unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(25),
            "rung after unregister"
        );
    }
}
