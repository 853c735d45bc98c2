//! The control plane's own thread: the control socket (`wg`, `tapir
//! status`) and host-name look-ups, kept off the packet path.
//!
//! ```text
//!   a thread per connection: read request (deadline, line cap) ─▶ control thread ─┐
//!   control thread: accept; Message::Request ───────────────────────────────────────┤
//!                   resolve(host) (blocking DNS) ─▶ Message::Resolved ───────────────┤ channel + wake bell
//!   packet thread:  poll(..., wake) ─▶ drain ─▶ answer from the tunnel's state (µs) ◀┘ ─▶ reply channel
//! ```
//! The packet thread never reads from a client or waits for DNS: it only
//! answers from memory what has already been read whole, so a slow or
//! hostile client of the socket, or a slow resolver, costs it nothing; and
//! a client costs other clients nothing either (each has a thread, up to
//! [`crate::uapi::CLIENT_THREADS`]).

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use tapir_proto::wg::keys::PublicKey;

use super::bell::Bell;
use super::reload::Reloader;
use crate::uapi::{self, ControlSocket, Reply, Request};

/// What the control thread hands the packet thread.
pub enum Message {
    /// A whole request, where its reply goes, and who has it (see
    /// [`Taken`]): a change the client was told timed out is not made.
    Request(Request, mpsc::Sender<String>, Taken),
    /// A peer's host name resolved again.
    Resolved(PublicKey, SocketAddr),
}

/// Whether a request is the packet thread's to carry out, or was given up
/// by the control thread (its client told it timed out): whichever says so
/// first. Once the packet thread has it, its answer is waited for, however
/// long the work takes (a change of 100,000 allowed IPs is made and said,
/// not made and said to have failed).
#[derive(Clone, Default)]
pub struct Taken(Arc<std::sync::atomic::AtomicU8>);

impl Taken {
    const WAITING: u8 = 0;
    const TAKEN: u8 = 1;
    const GIVEN_UP: u8 = 2;

    /// The packet thread takes the request: `false` if it was given up.
    pub fn take(&self) -> bool {
        self.swap_from_waiting(Self::TAKEN)
    }

    /// The control thread gives the request up: `false` if the packet
    /// thread has it already.
    fn give_up(&self) -> bool {
        self.swap_from_waiting(Self::GIVEN_UP)
    }

    fn swap_from_waiting(&self, to: u8) -> bool {
        self.0
            .compare_exchange(Self::WAITING, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// How long a request the packet thread has taken may take at most.
const WORK_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

/// The packet thread's end.
pub struct ControlLink {
    /// Messages from the control thread.
    pub messages: mpsc::Receiver<Message>,
    /// Rung when messages wait (or the control thread stops): poll it with
    /// the device and sockets.
    pub wake: Arc<Bell>,
    /// Host names to look up (peer, `host:port`).
    resolve: mpsc::Sender<(PublicKey, String)>,
    /// The control thread's bell.
    control: Arc<Bell>,
}

/// The control thread's end.
pub struct ControlEnd {
    to: ToPacket,
    resolve: mpsc::Receiver<(PublicKey, String)>,
    /// Rung for a look-up to make, a reload or shutdown to see (by the
    /// signal watcher), and when the packet threads are done.
    bell: Arc<Bell>,
}

/// A connected pair of ends; `bell` wakes the control thread.
pub fn pair(bell: Arc<Bell>) -> io::Result<(ControlLink, ControlEnd)> {
    let wake = Arc::new(Bell::new()?);
    let (tx, rx) = mpsc::channel();
    let (rtx, rrx) = mpsc::channel();
    Ok((
        ControlLink {
            messages: rx,
            wake: Arc::clone(&wake),
            resolve: rtx,
            control: Arc::clone(&bell),
        },
        ControlEnd {
            to: ToPacket { messages: tx, wake },
            resolve: rrx,
            bell,
        },
    ))
}

impl ControlLink {
    /// Asks the control thread to look `host` up again for peer `key`; the
    /// answer comes back as [`Message::Resolved`].
    pub fn resolve(&self, key: PublicKey, host: String) {
        if self.resolve.send((key, host)).is_ok() {
            self.control.ring();
        }
    }
}

/// The way to the packet thread, which the control thread and the reload
/// thread share.
struct ToPacket {
    messages: mpsc::Sender<Message>,
    /// The packet thread's bell.
    wake: Arc<Bell>,
}

impl ToPacket {
    fn send(&self, m: Message) -> bool {
        if self.messages.send(m).is_err() {
            return false;
        }
        self.wake.ring();
        true
    }

    /// Asks the packet thread; its answer, or an errno if it is gone or slow.
    fn ask(&self, request: Request) -> String {
        let (tx, rx) = mpsc::channel();
        let taken = Taken::default();
        if !self.send(Message::Request(request, tx, taken.clone())) {
            return "errno=5\n\n".to_string(); // EIO: the tunnel is gone
        }
        // ETIMEDOUT if the packet thread does not take it in time; once
        // taken, its answer.
        match rx.recv_timeout(uapi::DEADLINE) {
            Ok(reply) => reply,
            Err(_) if taken.give_up() => "errno=110\n\n".into(),
            Err(_) => rx
                .recv_timeout(WORK_LIMIT)
                .unwrap_or_else(|_| "errno=110\n\n".into()),
        }
    }

    /// A reload (see [`super::reload`]): the reply's lines, `errno` last.
    /// Its file is read and its host names looked up on a thread of its
    /// own, waited for until `stop`: a resolver that does not answer held
    /// a SIGTERM 16 s.
    fn reload(&self, reloader: &mut Reloader, stop: &dyn Fn() -> bool) -> String {
        crate::notify::reloading();
        let r = reloader.clone();
        let plan = until_stopped(move || r.prepare(), stop).unwrap_or_else(|| {
            Err("the tunnel is stopping (the file's host names were still being looked up)".into())
        });
        let reply = match plan {
            Err(e) => {
                eprintln!("tapir: reload refused, nothing changed: {e}");
                format!("tapir_error={}\nerrno=22\n\n", e.replace('\n', " "))
            }
            Ok(plan) => {
                let notes = plan.notes.clone();
                let applied = self.ask(Request::Apply(Box::new(plan.reapply())));
                // The packet thread did not take the peers (it was gone, or
                // too busy to answer in time, and then does not act on it
                // later): nothing changed, the routes and the record of the
                // configuration included, and it says so.
                let Some(body) = applied.strip_suffix("errno=0\n\n") else {
                    let errno = applied.trim().rsplit("errno=").next().unwrap_or("5");
                    let why = match errno {
                        "110" => "the tunnel did not take the new peers in time",
                        _ => "the tunnel is gone",
                    };
                    eprintln!("tapir: reload failed, nothing changed: {why} (errno {errno})");
                    crate::notify::send("READY=1");
                    return format!("tapir_error={why}; nothing changed\nerrno={errno}\n\n");
                };
                // A port the packet thread could not move to is said as the
                // file says it: with routes it could not make, what failed
                // of a reload that happened for the rest (`tapir reload`
                // exits 1); the notes name what a reload does not change.
                let mut out = String::new();
                let mut failed = Vec::new();
                for line in body.lines() {
                    match line.strip_prefix("tapir_listen_port_errno=") {
                        Some(e) => failed.push(plan.port_refused(e.parse().unwrap_or(libc::EIO))),
                        None => out += &format!("{line}\n"),
                    }
                }
                failed.extend(reloader.finish(plan));
                eprintln!(
                    "tapir: reloaded {}: {}",
                    reloader.file().display(),
                    in_words(&out)
                );
                for n in &notes {
                    eprintln!("tapir: reload: {n}");
                    out += &format!("tapir_note={n}\n");
                }
                for n in &failed {
                    eprintln!("tapir: reload: {n}");
                    out += &format!("tapir_failed={n}\n");
                }
                out + "errno=0\n\n"
            }
        };
        crate::notify::send("READY=1");
        reply
    }
}

impl ControlEnd {
    /// A thread that looks host names up one after another and hands each
    /// answer to the packet thread; it ends when the returned end goes (or
    /// the packet thread does). `None` if no thread could be made.
    fn resolver(&self) -> Option<mpsc::Sender<(PublicKey, String)>> {
        let (tx, rx) = mpsc::channel::<(PublicKey, String)>();
        let (messages, wake) = (self.to.messages.clone(), Arc::clone(&self.to.wake));
        std::thread::Builder::new()
            .name("tapir-resolve".into())
            .spawn(move || {
                // A peer asked for again while it waits is looked up once
                // (a dead name takes 15 s, and is asked for every 30 s).
                let mut queue = std::collections::VecDeque::new();
                let mut waiting = std::collections::HashMap::new();
                loop {
                    if queue.is_empty() {
                        let Ok((key, host)) = rx.recv() else {
                            return;
                        };
                        queue.push_back(key);
                        waiting.insert(key, host);
                    }
                    while let Ok((key, host)) = rx.try_recv() {
                        if waiting.insert(key, host).is_none() {
                            queue.push_back(key);
                        }
                    }
                    let Some(key) = queue.pop_front() else {
                        continue;
                    };
                    let Some(host) = waiting.remove(&key) else {
                        continue;
                    };
                    if let Some(addr) = look_up(&host) {
                        if messages.send(Message::Resolved(key, addr)).is_err() {
                            return;
                        }
                        wake.ring();
                    }
                }
            })
            .ok()
            .map(|_| tx)
    }

    /// Serves `socket` (if any), look-ups and reloads (asked on the socket,
    /// or by SIGHUP through `reloads`, a count that goes up) until `stop`.
    /// Reloads run on a thread of their own, and the changes (`wg set`)
    /// with them, in the order they came: a reload waits for its file's
    /// host names (a resolver that does not answer holds it for 10 s or
    /// more), and a status asked meanwhile is answered meanwhile (a `wg
    /// show` waited for it when it ran here), while a change asked after a
    /// reload is made after it, as before, not undone by it.
    pub fn run(
        self,
        socket: Option<&ControlSocket>,
        reloader: Reloader,
        reloads: &AtomicU64,
        stop: &(dyn Fn() -> bool + Sync),
    ) {
        let reloader = Mutex::new(reloader);
        let to = &self.to;
        let reload_once = || {
            to.reload(
                &mut reloader.lock().unwrap_or_else(|e| e.into_inner()),
                stop,
            )
        };
        let reload_now = |reply: Option<Reply>| {
            let r = reload_once();
            if let Some(reply) = reply {
                reply.send(r);
            }
        };
        std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel::<Ordered>();
            let reload_once = &reload_once;
            let on_thread = std::thread::Builder::new()
                .name("tapir-reloads".into())
                .spawn_scoped(s, move || {
                    let mut next = None;
                    while let Some(work) = next.take().or_else(|| rx.recv().ok()) {
                        let first = match work {
                            Ordered::Change(request, reply) => {
                                reply.send(to.ask(request));
                                continue;
                            }
                            Ordered::Reload(first) => first,
                        };
                        // Those asked for meanwhile (up to a change) share
                        // one: the file as it is now.
                        let mut waiting: Vec<Reply> = first.into_iter().collect();
                        while let Ok(w) = rx.try_recv() {
                            match w {
                                Ordered::Reload(reply) => waiting.extend(reply),
                                change => {
                                    next = Some(change);
                                    break;
                                }
                            }
                        }
                        let r = reload_once();
                        for reply in waiting {
                            reply.send(r.clone());
                        }
                    }
                })
                .is_ok();
            // (No thread: here, as before.)
            let ordered = |work: Ordered| {
                let work = if on_thread {
                    match tx.send(work) {
                        Ok(()) => return,
                        Err(mpsc::SendError(work)) => work,
                    }
                } else {
                    work
                };
                match work {
                    Ordered::Reload(reply) => reload_now(reply),
                    Ordered::Change(request, reply) => reply.send(to.ask(request)),
                }
            };
            let mut seen = reloads.load(Ordering::Relaxed);
            let mut answer = |request: Request, reply: Reply| match request {
                Request::Reload => ordered(Ordered::Reload(Some(reply))),
                // Only this thread makes those.
                Request::Apply(_) => reply.send("errno=22\n\n".into()),
                request @ Request::Set(_) => ordered(Ordered::Change(request, reply)),
                status => reply.send(to.ask(status)),
            };
            // Host names are looked up on a thread of their own: a resolver
            // that does not answer holds each look-up for 10 s or more, and
            // with them every request of the socket when they ran here. (No
            // thread: here, as before.)
            let lookups = self.resolver();
            let mut idle = || {
                while let Ok((key, host)) = self.resolve.try_recv() {
                    match &lookups {
                        Some(l) => {
                            let _ = l.send((key, host));
                        }
                        None => {
                            if let Some(addr) = look_up(&host) {
                                to.send(Message::Resolved(key, addr));
                            }
                        }
                    }
                }
                let now = reloads.load(Ordering::Relaxed);
                if now != seen {
                    seen = now;
                    ordered(Ordered::Reload(None));
                }
            };
            match socket {
                Some(s) => s.run(stop, Some(&self.bell), None, &mut answer, &mut idle),
                None => {
                    while !stop() {
                        idle();
                        if let Err(e) = self.bell.wait(None) {
                            eprintln!("tapir: control thread: {e}");
                            break;
                        }
                    }
                }
            }
        });
        // The packet thread sleeps until something happens: this is it.
        self.to.wake.ring();
    }
}

/// What the reload thread does, in the order asked: a reload (its reply,
/// if it was asked on the socket), or a change to make after the reloads
/// asked before it.
enum Ordered {
    Reload(Option<Reply>),
    Change(Request, Reply),
}

/// `work` on a thread of its own, its result once done; `None` if `stop`
/// came first (or no thread could be made): the thread is left to end
/// alone.
fn until_stopped<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
    stop: &dyn Fn() -> bool,
) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("tapir-reload".into())
        .spawn(move || {
            let _ = tx.send(work());
        })
        .ok()?;
    loop {
        match rx.recv_timeout(std::time::Duration::from_millis(100)) {
            Ok(t) => return Some(t),
            Err(mpsc::RecvTimeoutError::Timeout) if !stop() => {}
            Err(_) => return None,
        }
    }
}

/// `host:port`'s first address (blocking: the system's resolver).
fn look_up(host: &str) -> Option<SocketAddr> {
    host.to_socket_addrs().ok().and_then(|mut a| a.next())
}

/// A reload's reply lines (`tapir_added=1` ...) in words for the log.
fn in_words(reply: &str) -> String {
    let mut words = Vec::new();
    let (mut added, mut removed, mut changed) = ("0", "0", "0");
    for (k, v) in reply.lines().filter_map(|l| l.split_once('=')) {
        match k {
            "tapir_added" => added = v,
            "tapir_removed" => removed = v,
            "tapir_changed" => changed = v,
            "tapir_listen_port" => words.push(format!("now on port {v}")),
            "tapir_private_key" => words.push("a new private key".into()),
            _ => {}
        }
    }
    words.insert(
        0,
        format!("{added} peer(s) added, {removed} removed, {changed} changed"),
    );
    words.join("; ")
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_reload_is_logged_in_words() {
        assert_eq!(
            in_words("tapir_added=1\ntapir_removed=0\ntapir_changed=2\ntapir_listen_port=51900\n"),
            "1 peer(s) added, 0 removed, 2 changed; now on port 51900"
        );
    }

    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A tunnel's file, and a reloader for it as first read.
    fn reloader(dir: &std::path::Path) -> (std::path::PathBuf, Reloader) {
        let file = dir.join("tq9.conf");
        let key = tapir_proto::wg::keys::PrivateKey::from_random([3; 32]);
        let peer = tapir_proto::wg::keys::PrivateKey::from_random([4; 32]).public_key();
        std::fs::write(
            &file,
            format!(
                "[Interface]\nPrivateKey = {}\n\n[Peer]\nPublicKey = {peer}\nAllowedIPs = 10.0.0.2/32\n",
                key.to_base64()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = crate::config::load_any(&file).unwrap().remove(0);
        (file, Reloader::new(config))
    }

    #[test]
    fn a_reload_the_packet_thread_does_not_take_changes_nothing_and_says_so() {
        let dir = std::env::temp_dir().join(format!("tapir-control-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (file, mut r) = reloader(&dir);
        // The file gains a peer.
        let more = tapir_proto::wg::keys::PrivateKey::from_random([5; 32]).public_key();
        let mut text = std::fs::read_to_string(&file).unwrap();
        text += &format!("\n[Peer]\nPublicKey = {more}\nAllowedIPs = 10.0.0.3/32\n");
        std::fs::write(&file, text).unwrap();
        let peers = |r: &Reloader| r.current().peers.len();
        assert_eq!(peers(&r), 1);

        // The packet thread is slow: it never answers in time.
        let (link, end) = pair(Arc::new(Bell::new().unwrap())).unwrap();
        let reply = end.to.reload(&mut r, &|| false);
        assert!(
            reply.contains("tapir_error=the tunnel did not take the new peers in time")
                && reply.ends_with("\nerrno=110\n\n")
                && reply.matches("errno=").count() == 1,
            "{reply}"
        );
        assert_eq!(peers(&r), 1, "the configuration on record is the old one");

        // It is gone.
        drop(link);
        let reply = end.to.reload(&mut r, &|| false);
        assert!(
            reply.contains("tapir_error=the tunnel is gone") && reply.ends_with("\nerrno=5\n\n"),
            "{reply}"
        );
        assert_eq!(peers(&r), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A whole request over a control socket, and its whole reply (an
    /// error after 10 s: the reply never came).
    fn request(path: &std::path::Path, text: &str) -> io::Result<String> {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(path)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        s.write_all(text.as_bytes())?;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(b"\n\n") {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&got).into_owned())
    }

    struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool, &'a Bell);

    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
            self.1.ring();
        }
    }

    /// A reload waits on a thread of its own (for its file's host names;
    /// here for its file, a named pipe that nobody writes yet): a status
    /// asked meanwhile is answered meanwhile, a change asked meanwhile is
    /// made after the reload (not undone by it), and the reload's own reply
    /// comes once it is done. (The control thread waited for the reload,
    /// and a `wg show` with it, 14.5 s with a resolver that did not answer.)
    #[test]
    fn requests_are_answered_while_a_reload_waits() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = std::env::temp_dir().join(format!("tapir-reloading-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (file, r) = reloader(&dir);
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::remove_file(&file).unwrap();
        let made = std::process::Command::new("mkfifo")
            .args(["-m", "600"])
            .arg(&file)
            .status()
            .unwrap();
        assert!(made.success());
        let host = crate::scope::Scope::fake(1, true);
        let (socket, _) = ControlSocket::bind_in(&dir.join("wg"), &host, "tq9").unwrap();
        let path = dir.join("wg").join("tq9.sock");
        let (link, end) = pair(Arc::new(Bell::new().unwrap())).unwrap();
        let control = Arc::clone(&link.control);
        let stop = std::sync::atomic::AtomicBool::new(false);
        // What the packet thread was asked, in order.
        let asked = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            s.spawn(|| {
                end.run(Some(&socket), r, &AtomicU64::new(0), &|| {
                    stop.load(Ordering::SeqCst)
                })
            });
            // The packet thread: every request answered at once.
            let (stop, asked) = (&stop, &asked);
            s.spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let wait = std::time::Duration::from_millis(50);
                    let _ = tapir_sys::poll::readable([link.wake.fd()], wait);
                    link.wake.drain();
                    while let Ok(m) = link.messages.try_recv() {
                        if let Message::Request(request, reply, taken) = m {
                            if taken.take() {
                                let what = match &request {
                                    Request::Apply(_) => "apply",
                                    Request::Set(_) => "set",
                                    _ => "get",
                                };
                                asked.lock().unwrap().push(what);
                                let _ = reply.send(match request {
                                    Request::Apply(_) => "tapir_added=0\ntapir_removed=0\ntapir_changed=0\nerrno=0\n\n".into(),
                                    _ => "listen_port=7\nerrno=0\n\n".to_string(),
                                });
                            }
                        }
                    }
                }
            });
            // Everything stops when this goes, also on a failed assertion.
            let _stop = StopOnDrop(stop, &control);
            let reloading = s.spawn(|| request(&path, "tapir-reload=1\n\n"));
            // The reload reads the pipe: a writer can open it (and the
            // reader then waits for its text).
            let started = std::time::Instant::now();
            let writer = loop {
                match std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&file)
                {
                    Ok(w) => break w,
                    Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                        assert!(
                            started.elapsed().as_secs() < 10,
                            "the reload never read its file"
                        );
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) => panic!("{e}"),
                }
            };
            let shown = request(&path, "get=1\n\n");
            let setting = s.spawn(|| request(&path, "set=1\n\n"));
            std::thread::sleep(std::time::Duration::from_millis(200));
            let waiting = !reloading.is_finished() && !setting.is_finished();
            // The reload goes on, whatever came of it.
            {
                use std::io::Write;
                let mut w = writer;
                w.write_all(text.as_bytes()).unwrap();
            }
            let reloaded = reloading.join().unwrap();
            let set = setting.join().unwrap();
            let shown = shown.expect("answered while the reload waits");
            assert_eq!(shown, "listen_port=7\nerrno=0\n\n");
            assert!(
                waiting,
                "the reload, and the change after it, waited for its file"
            );
            assert_eq!(set.unwrap(), "listen_port=7\nerrno=0\n\n");
            assert_eq!(*asked.lock().unwrap(), ["get", "apply", "set"]);
            let reloaded = reloaded.unwrap();
            assert!(
                reloaded.ends_with("\nerrno=0\n\n") && reloaded.contains("tapir_added=0"),
                "{reloaded}"
            );
        });
        drop(socket);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn work_left_to_its_thread_when_the_tunnel_stops() {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = Arc::clone(&done);
        let asked = std::time::Instant::now();
        let stop = || asked.elapsed() > std::time::Duration::from_millis(200);
        let r = until_stopped(
            move || {
                std::thread::sleep(std::time::Duration::from_secs(3));
                d.store(true, Ordering::SeqCst);
            },
            &stop,
        );
        assert!(
            r.is_none() && !done.load(Ordering::SeqCst),
            "waited for the work"
        );
        assert_eq!(until_stopped(|| 7, &|| false), Some(7));
    }

    #[test]
    fn a_host_name_looked_up_again_reaches_the_packet_thread() {
        let dir = std::env::temp_dir().join(format!("tapir-resolve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (_, r) = reloader(&dir);
        let (link, end) = pair(Arc::new(Bell::new().unwrap())).unwrap();
        let key = tapir_proto::wg::keys::PrivateKey::from_random([6; 32]).public_key();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| end.run(None, r, &AtomicU64::new(0), &|| stop.load(Ordering::SeqCst)));
            link.resolve(key, "127.0.0.1:51820".into());
            // The packet thread's bell rings, and the answer waits.
            tapir_sys::poll::readable([link.wake.fd()], std::time::Duration::from_secs(5)).unwrap();
            let m = link
                .messages
                .recv_timeout(std::time::Duration::from_secs(5));
            assert!(
                matches!(m, Ok(Message::Resolved(k, a)) if k == key && a == "127.0.0.1:51820".parse().unwrap()),
                "no answer"
            );
            stop.store(true, Ordering::SeqCst);
            link.control.ring();
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod taken_tests {
    use super::Taken;

    #[test]
    fn a_request_is_either_taken_or_given_up_never_both() {
        let t = Taken::default();
        assert!(t.take());
        assert!(!t.give_up(), "taken: its answer is waited for");
        let t = Taken::default();
        assert!(t.give_up());
        assert!(!t.take(), "given up: not carried out");
    }
}
