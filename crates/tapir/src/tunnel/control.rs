//! The control plane's own thread: the control socket (`wg`, `tapir
//! status`) and host-name look-ups, kept off the packet path.
//!
//! ```text
//!   control thread: accept ─▶ read request (deadline, line cap) ─▶ Message::Request ─┐
//!                   resolve(host) (blocking DNS) ─▶ Message::Resolved ───────────────┤ channel + wake byte
//!   packet thread:  poll(..., wake) ─▶ drain ─▶ answer from the tunnel's state (µs) ◀┘ ─▶ reply channel
//! ```
//! The packet thread never reads from a client or waits for DNS: it only
//! answers from memory what the control thread has already read whole, so
//! a slow or hostile client of the socket, or a slow resolver, costs it
//! nothing.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use tapir_proto::wg::keys::PublicKey;

use super::reload::Reloader;
use crate::uapi::{self, ControlSocket, Request};

/// What the control thread hands the packet thread.
pub enum Message {
    /// A whole request, where its reply goes, and until when the client
    /// waits for it: a change asked for is not made after that (the client
    /// was told it timed out).
    Request(Request, mpsc::Sender<String>, std::time::Instant),
    /// A peer's host name resolved again.
    Resolved(PublicKey, SocketAddr),
}

/// The packet thread's end.
pub struct ControlLink {
    /// Messages from the control thread.
    pub messages: mpsc::Receiver<Message>,
    /// Readable when messages wait: poll it with the device and sockets.
    pub wake: UnixStream,
    /// Host names to look up (peer, `host:port`).
    pub resolve: mpsc::Sender<(PublicKey, String)>,
}

/// The control thread's end.
pub struct ControlEnd {
    messages: mpsc::Sender<Message>,
    wake: UnixStream,
    resolve: mpsc::Receiver<(PublicKey, String)>,
}

/// A connected pair of ends.
pub fn pair() -> io::Result<(ControlLink, ControlEnd)> {
    let (a, b) = UnixStream::pair()?;
    a.set_nonblocking(true)?;
    b.set_nonblocking(true)?;
    let (tx, rx) = mpsc::channel();
    let (rtx, rrx) = mpsc::channel();
    Ok((
        ControlLink {
            messages: rx,
            wake: a,
            resolve: rtx,
        },
        ControlEnd {
            messages: tx,
            wake: b,
            resolve: rrx,
        },
    ))
}

impl ControlLink {
    /// Empties the wake socket (the messages themselves are in the channel).
    pub fn drain_wake(&self) {
        let mut buf = [0u8; 64];
        while matches!((&self.wake).read(&mut buf), Ok(n) if n > 0) {}
    }
}

impl ControlEnd {
    fn send(&self, m: Message) -> bool {
        if self.messages.send(m).is_err() {
            return false;
        }
        // A full wake socket already says "messages wait".
        let _ = (&self.wake).write(&[1]);
        true
    }

    /// Asks the packet thread; its answer, or an errno if it is gone or slow.
    fn ask(&self, request: Request) -> String {
        let (tx, rx) = mpsc::channel();
        let deadline = std::time::Instant::now() + uapi::DEADLINE;
        if !self.send(Message::Request(request, tx, deadline)) {
            return "errno=5\n\n".to_string(); // EIO: the tunnel is gone
        }
        // ETIMEDOUT if the packet thread does not answer in time.
        rx.recv_timeout(uapi::DEADLINE)
            .unwrap_or_else(|_| "errno=110\n\n".into())
    }

    /// A reload (see [`super::reload`]): the reply's lines, `errno` last.
    fn reload(&self, reloader: &RefCell<Reloader>) -> String {
        crate::notify::reloading();
        let plan = reloader.borrow().prepare();
        let reply = match plan {
            Err(e) => {
                eprintln!("tapir: reload refused, nothing changed: {e}");
                format!("tapir_error={}\nerrno=22\n\n", e.replace('\n', " "))
            }
            Ok(plan) => {
                let notes = plan.notes.clone();
                let applied = self.ask(Request::Apply(plan.peers.clone()));
                let problems = reloader.borrow_mut().finish(plan);
                let body = applied.strip_suffix("errno=0\n\n").unwrap_or(&applied);
                let mut out = body.to_owned();
                for n in notes.iter().chain(&problems) {
                    eprintln!("tapir: reload: {n}");
                    out += &format!("tapir_note={n}\n");
                }
                eprintln!(
                    "tapir: reloaded {}: {}",
                    reloader.borrow().file().display(),
                    body.trim().replace('\n', ", ")
                );
                out + "errno=0\n\n"
            }
        };
        crate::notify::send("READY=1");
        reply
    }

    /// Serves `socket` (if any), look-ups and reloads (asked on the socket,
    /// or by SIGHUP through `reloads`, a count that goes up) until `stop`.
    pub fn run(
        self,
        socket: Option<&ControlSocket>,
        reloader: Reloader,
        reloads: &AtomicU64,
        stop: &dyn Fn() -> bool,
    ) {
        let reloader = RefCell::new(reloader);
        let mut seen = reloads.load(Ordering::Relaxed);
        let mut answer = |request: Request| match request {
            Request::Reload => self.reload(&reloader),
            // Only this thread makes those.
            Request::Apply(_) => "errno=22\n\n".into(),
            other => self.ask(other),
        };
        let mut idle = || {
            while let Ok((key, host)) = self.resolve.try_recv() {
                if let Some(addr) = host.to_socket_addrs().ok().and_then(|mut a| a.next()) {
                    self.send(Message::Resolved(key, addr));
                }
            }
            let now = reloads.load(Ordering::Relaxed);
            if now != seen {
                seen = now;
                self.reload(&reloader);
            }
        };
        match socket {
            Some(s) => s.run(stop, &mut answer, &mut idle),
            None => {
                while !stop() {
                    idle();
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
        }
    }
}
