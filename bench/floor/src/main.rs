//! The floor of an encrypting tunnel: what any of them must do for a
//! packet, and nothing else. Device to network: poll, read, seal with
//! ChaCha20-Poly1305 (ring, as tapir), send; network to device: receive,
//! open, write. One thread, one peer, no handshake, no timers, no state but
//! a counter.
//!
//! A measuring stick for `bench/peers.sh` (its "encrypting floor" row), to
//! tell what an unencrypted relay such as VTun gains from not encrypting
//! and how far a real tunnel is from the least it could cost. **Not a
//! tunnel**: a key fixed in the source, the same for both ends and both
//! directions (nonces repeat), no replay check.
//!
//! Run: `tapir-floor DEVICE LISTEN_PORT PEER_ADDR:PORT` (a tun device of
//! that name is created; give it an address and an MTU 32 bytes below the
//! path's).
//!
//! `FLOOR_WITH` (a `+`-separated list) makes the same loop use the kernel
//! the way tapir does, one choice at a time, so that `bench/ping.sh` can
//! tell what each costs a ping apart from tapir's own work:
//! - `epoll`: waits with `epoll_wait` on a kept set of four descriptors
//!   (the device, the socket, a timerfd and an eventfd, as tapir's packet
//!   loop did over UDP until it took `spare`: its deadline and its bell),
//!   not `poll(2)` on two;
//! - `v6`: one dual-stack socket (`[::]`, the peer as a v4-mapped address);
//! - `recvmsg`: receives with `recvmsg(2)`, the sender's address and a
//!   control buffer (tapir needs both: roaming, and the segment size of a
//!   coalesced receive), not `recv(2)`;
//! - `gro`: `UDP_GRO` on the socket (implies `recvmsg`);
//! - `vnet`: the device with a virtio-net header and TSO offloads (for
//!   pings only: this floor neither completes checksums nor cuts
//!   super-packets, so TCP and UDP through it fail).
//!
//! - `vnethdr`: the virtio-net header without the offloads (the device
//!   then gets packets checksummed and cut to its MTU, as without one);
//! - `spare`: `poll(2)` on the two and a third entry of -1, which the
//!   kernel skips: tapir's wait when no signal came (its bell and its
//!   deadline come as a signal that fills the spare entry; see
//!   `tapir_sys::interrupt`).
//!
//! - `connect`: the socket connected to the peer, `send(2)` and `recv(2)`
//!   without addresses (the kernel keeps the route, and finds the socket
//!   and the route of what arrives at once): pinned, 20 rounds, 25.93 µs
//!   against the floor's 27.14, and floor+tapir+connect 26.74 against
//!   floor+tapir's 27.66; floor+v6+connect 28.23 against floor+connect's
//!   27.56 (a dual-stack socket costs a connected one 0.67 µs). What
//!   tapir does for a lone peer (its `connected` socket), and VTun always.
//!
//! `tapir` stands for what tapir's packet loop does for a lone datagram
//! (a ping): `spare`, `v6`, `vnet`, and `recvfrom` (lone datagrams are
//! received so, with GRO off: its lone mode). And alternatives, to tell where a cost
//! lies (each against the plain floor, `bench/ping.sh` pinned, 40 rounds):
//! - `epoll2`, `epoll3`: epoll with the device and the socket alone, or
//!   with the timerfd too (epoll itself costs what four cost: ~0.8 µs);
//! - `poll3`, `poll4`: `poll(2)` on three or four (each idle descriptor
//!   costs ~0.2 µs: it is looked at and waited on at every call);
//! - `sig`: `ppoll(2)` on two, a signal unblocked only in the wait and a
//!   POSIX timer that would send it (a bell and a deadline without
//!   descriptors: the signal mask costs ~0.5 µs);
//! - `timeout`: `poll(2)` on two with a timeout (a timer armed at each
//!   wait: ~0.7 µs);
//! - `recvfrom`: `recvfrom(2)` with the sender's address (~0.15 µs over
//!   `recv`); `recvmsg0`: `recvmsg(2)` without a control buffer (the same
//!   as with one: what `recvmsg` costs is its header, ~0.4 µs over
//!   `recvfrom`).
//! - `block`: no wait at all: a thread a direction, each blocked in its
//!   read (the device's, the socket's), two system calls a packet where
//!   the poll loop makes three or four. Pinned to one CPU, 1.3-1.5 µs
//!   less a ping (27.23 against 25.69 µs; floor+tapir 27.66 against
//!   26.35); unpinned, 32 µs more (51.74 against 83.59): the answer a
//!   write to the device brings is read by the other thread, woken on
//!   the other CPU, where the poll loop finds it at once on its own.
//!   Why tapir's packet loop waits on both with one thread when light.
//!   (io_uring, a read and a receive posted, sends and writes queued, one
//!   `io_uring_enter` a turn, was tried too and not kept: pinned, 2.6 µs
//!   more than this floor with a single issuer and deferred task work,
//!   4 µs more without.)

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

/// Counter (8 bytes, after 8 of padding), then the sealed packet and its tag.
const HEADER: usize = 16;
const TAG: usize = 16;
/// The virtio-net header before each packet on a device made with `vnet`.
const VNET: usize = 10;
/// `UDP_GRO` (linux/udp.h).
const UDP_GRO: libc::c_int = 104;

/// The kernel-side choices of `FLOOR_WITH`.
#[derive(Default)]
struct With {
    epoll: bool,
    v6: bool,
    recvmsg: bool,
    gro: bool,
    vnet: bool,
    /// `poll(2)` on the four descriptors `epoll` keeps.
    poll4: bool,
    /// `ppoll(2)` on the device and the socket, a signal unblocked only
    /// in the wait, and an idle POSIX timer that would send it.
    sig: bool,
    /// `poll(2)` with a timeout of a second (a high-resolution timer armed
    /// and cancelled at each wait), not none.
    timeout: bool,
    /// `recvfrom(2)` with the sender's address, no control buffer.
    recvfrom: bool,
    /// `recvmsg(2)` with the sender's address and no control buffer.
    recvmsg0: bool,
    /// `poll(2)` with a third entry of -1.
    spare: bool,
    /// The virtio-net header without the offloads.
    vnethdr: bool,
    /// Idle descriptors in the set beyond the device and the socket (2 unless said).
    idle: Option<usize>,
    /// Two threads, one a direction, each blocked in its read: no wait.
    block: bool,
    /// The socket connected to the peer: `send(2)` and `recv(2)`, no
    /// addresses (and the kernel's cached route and early demux).
    connect: bool,
}

impl With {
    fn parse(s: &str) -> Result<Self, String> {
        let mut w = With::default();
        for word in s.split('+').filter(|w| !w.is_empty()) {
            match word {
                "epoll" => w.epoll = true,
                "v6" => w.v6 = true,
                "recvmsg" => w.recvmsg = true,
                "gro" => (w.gro, w.recvmsg) = (true, true),
                "vnet" => w.vnet = true,
                "poll4" => w.poll4 = true,
                "sig" => w.sig = true,
                "timeout" => w.timeout = true,
                "recvfrom" => w.recvfrom = true,
                "spare" => w.spare = true,
                "vnethdr" => w.vnethdr = true,
                "recvmsg0" => (w.recvmsg, w.recvmsg0) = (true, true),
                "poll3" => (w.poll4, w.idle) = (true, Some(1)),
                "epoll2" => (w.epoll, w.idle) = (true, Some(0)),
                "epoll3" => (w.epoll, w.idle) = (true, Some(1)),
                "block" => w.block = true,
                "connect" => w.connect = true,
                "tapir" => {
                    w = With {
                        spare: true,
                        v6: true,
                        vnet: true,
                        recvfrom: true,
                        ..With::default()
                    }
                }
                _ => {
                    return Err(format!(
                        "FLOOR_WITH: unknown choice '{word}' (known: epoll, v6, recvmsg, gro, vnet, vnethdr, spare, block, connect, tapir)"
                    ));
                }
            }
        }
        if w.connect {
            // A connected socket hears its peer alone: no sender to learn.
            (w.recvfrom, w.recvmsg, w.recvmsg0) = (false, w.gro, false);
        }
        Ok(w)
    }
}

fn check(r: libc::c_int, what: &str) -> RawFd {
    if r < 0 {
        panic!("{what}: {}", std::io::Error::last_os_error());
    }
    r
}

fn tun(name: &str, vnet: bool, offloads: bool) -> std::io::Result<OwnedFd> {
    // SAFETY: a plain open(2) of a NUL-terminated path.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    let vnet_flag = if vnet { libc::IFF_VNET_HDR } else { 0 };
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI | vnet_flag) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one live ifreq.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if vnet {
        let size = VNET as libc::c_int;
        let offloads = if offloads {
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        } else {
            0
        };
        // SAFETY: TUNSETVNETHDRSZ reads one live int; TUNSETOFFLOAD takes its flags by value.
        let ok = unsafe {
            libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) == 0
                && libc::ioctl(
                    fd.as_raw_fd(),
                    libc::TUNSETOFFLOAD,
                    offloads as libc::c_ulong,
                ) == 0
        };
        if !ok {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(fd)
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

/// How the loop waits: `poll(2)` on the device and the socket, or an
/// epoll set that also holds an idle timerfd and eventfd.
enum Wait {
    Poll(
        Vec<libc::pollfd>,
        #[allow(dead_code)] Vec<OwnedFd>,
        libc::c_int,
    ),
    /// The set, and the two descriptors it holds that never fire (kept
    /// open: epoll drops a closed one).
    Epoll(OwnedFd, #[allow(dead_code)] [OwnedFd; 2]),
    Sig([libc::pollfd; 2], libc::sigset_t),
}

extern "C" fn nothing(_: libc::c_int) {}

/// A timer an hour away, not repeating: one that never fires in a run.
const AN_HOUR: libc::itimerspec = libc::itimerspec {
    it_interval: libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    },
    it_value: libc::timespec {
        tv_sec: 3600,
        tv_nsec: 0,
    },
};

/// The `sig` wait: the signal blocked but in `ppoll`, and a timer armed
/// an hour away that would send it to this thread.
fn sig_wait(dev: RawFd, socket: RawFd) -> Wait {
    // SAFETY: plain data set up by libc's own calls; the handler does nothing.
    unsafe {
        let sig = libc::SIGRTMIN();
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = nothing as extern "C" fn(libc::c_int) as usize;
        check(libc::sigaction(sig, &sa, std::ptr::null_mut()), "sigaction");
        let mut block: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut block);
        libc::sigaddset(&mut block, sig);
        let mut during: libc::sigset_t = std::mem::zeroed();
        check(
            libc::pthread_sigmask(libc::SIG_BLOCK, &block, &mut during),
            "sigmask",
        );
        libc::sigdelset(&mut during, sig);
        let mut ev: libc::sigevent = std::mem::zeroed();
        ev.sigev_notify = libc::SIGEV_THREAD_ID;
        ev.sigev_signo = sig;
        ev.sigev_notify_thread_id = libc::gettid();
        let mut id: libc::timer_t = std::mem::zeroed();
        check(
            libc::timer_create(libc::CLOCK_MONOTONIC, &mut ev, &mut id),
            "timer_create",
        );
        let far = AN_HOUR;
        check(
            libc::timer_settime(id, 0, &far, std::ptr::null_mut()),
            "timer_settime",
        );
        let fds = [dev, socket].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        Wait::Sig(fds, during)
    }
}

impl Wait {
    fn new(epoll: bool, poll4: bool, idle: usize, spare: bool, dev: RawFd, socket: RawFd) -> Self {
        if !epoll && !poll4 {
            let fds: &[RawFd] = if spare {
                &[dev, socket, -1]
            } else {
                &[dev, socket]
            };
            return Wait::Poll(
                fds.iter()
                    .map(|&fd| libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect(),
                Vec::new(),
                -1,
            );
        }
        // SAFETY: descriptor-creating calls with no pointers but a live
        // itimerspec (read by timerfd_settime) and live epoll_events (read
        // by epoll_ctl); each descriptor is owned by nobody else.
        unsafe {
            let ep = OwnedFd::from_raw_fd(check(libc::epoll_create1(libc::EPOLL_CLOEXEC), "epoll"));
            let timer = check(
                libc::timerfd_create(
                    libc::CLOCK_MONOTONIC,
                    libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
                ),
                "timerfd",
            );
            let far = AN_HOUR;
            check(
                libc::timerfd_settime(timer, 0, &far, std::ptr::null_mut()),
                "timerfd",
            );
            let bell = check(
                libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC),
                "eventfd",
            );
            if poll4 {
                return Wait::Poll(
                    [dev, socket, timer, bell][..2 + idle]
                        .iter()
                        .map(|&fd| libc::pollfd {
                            fd,
                            events: libc::POLLIN,
                            revents: 0,
                        })
                        .collect(),
                    vec![OwnedFd::from_raw_fd(timer), OwnedFd::from_raw_fd(bell)],
                    -1,
                );
            }
            for (i, fd) in [dev, socket, timer, bell]
                .into_iter()
                .take(2 + idle)
                .enumerate()
            {
                let mut ev = libc::epoll_event {
                    events: libc::EPOLLIN as u32,
                    u64: i as u64,
                };
                check(
                    libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev),
                    "epoll_ctl",
                );
            }
            Wait::Epoll(
                ep,
                [OwnedFd::from_raw_fd(timer), OwnedFd::from_raw_fd(bell)],
            )
        }
    }

    /// Waits for the device or the socket: whether each is readable.
    fn wait(&mut self) -> [bool; 2] {
        match self {
            Wait::Poll(fds, _, ms) => {
                // SAFETY: poll reads and writes the live pollfds.
                if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, *ms) } < 0 {
                    return [false; 2];
                }
                [fds[0].revents != 0, fds[1].revents != 0]
            }
            Wait::Sig(fds, during) => {
                // SAFETY: ppoll reads and writes two live pollfds and reads a live mask.
                if unsafe { libc::ppoll(fds.as_mut_ptr(), 2, std::ptr::null(), &*during) } < 0 {
                    return [false; 2];
                }
                [fds[0].revents != 0, fds[1].revents != 0]
            }
            Wait::Epoll(ep, _) => {
                let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 4];
                // SAFETY: epoll_wait writes at most 4 events into a live array.
                let n = unsafe { libc::epoll_wait(ep.as_raw_fd(), evs.as_mut_ptr(), 4, -1) };
                let mut ready = [false; 2];
                for e in &evs[..usize::try_from(n).unwrap_or(0)] {
                    if let Some(r) = ready.get_mut(e.u64 as usize) {
                        *r = true;
                    }
                }
                ready
            }
        }
    }
}

/// One datagram into `buf`: by `recv(2)`, or by `recvmsg(2)` with the
/// sender's address and a control buffer.
fn receive(
    socket: &UdpSocket,
    buf: &mut [u8],
    with_msg: bool,
    from_too: bool,
    no_control: bool,
) -> Option<usize> {
    if from_too {
        return socket.recv_from(buf).ok().map(|(n, _)| n);
    }
    if !with_msg {
        return socket.recv(buf).ok();
    }
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: sockaddr_in6 and msghdr are plain data; all-zero is valid.
    let mut from: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
    h.msg_name = (&raw mut from).cast();
    h.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    h.msg_iov = &mut iov;
    h.msg_iovlen = 1;
    h.msg_control = control.as_mut_ptr().cast();
    h.msg_controllen = std::mem::size_of_val(&control);
    if no_control {
        h.msg_control = std::ptr::null_mut();
        h.msg_controllen = 0;
    }
    // SAFETY: recvmsg writes within the live buffers h points to.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut h, 0) };
    usize::try_from(n).ok()
}

/// The packet read into `buf[HEADER..HEADER + n]`: sealed in place with
/// the next counter and sent to `peer`.
#[inline]
fn seal_and_send(
    buf: &mut [u8],
    n: usize,
    sent: &mut u64,
    key: &LessSafeKey,
    socket: &UdpSocket,
    peer: SocketAddr,
    connected: bool,
) {
    *sent += 1;
    buf[8..HEADER].copy_from_slice(&sent.to_le_bytes());
    let packet = &mut buf[HEADER..HEADER + n];
    let Ok(tag) = key.seal_in_place_separate_tag(nonce(*sent), Aad::empty(), packet) else {
        return;
    };
    buf[HEADER + n..HEADER + n + TAG].copy_from_slice(tag.as_ref());
    if connected {
        let _ = socket.send(&buf[..HEADER + n + TAG]);
    } else {
        let _ = socket.send_to(&buf[..HEADER + n + TAG], peer);
    }
}

/// The `n` bytes received into `buf`: opened in place and written to the
/// device (after a virtio-net header of zeros, `vh` bytes: nothing
/// offloaded).
#[inline]
fn open_and_write(buf: &mut [u8], n: usize, key: &LessSafeKey, dev: RawFd, vh: usize) {
    if n < HEADER + TAG {
        return;
    }
    let counter = u64::from_le_bytes(buf[8..HEADER].try_into().expect("8 bytes"));
    let Ok(packet) = key.open_in_place(nonce(counter), Aad::empty(), &mut buf[HEADER..n]) else {
        return;
    };
    let len = packet.len();
    buf[HEADER - vh..HEADER].fill(0);
    let frame = &buf[HEADER - vh..HEADER + len];
    // SAFETY: write reads frame.len() bytes from a live slice.
    unsafe { libc::write(dev, frame.as_ptr().cast(), frame.len()) };
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, name, port, peer] = &args[..] else {
        eprintln!("usage: tapir-floor DEVICE LISTEN_PORT PEER_ADDR:PORT");
        std::process::exit(2);
    };
    let with = With::parse(&std::env::var("FLOOR_WITH").unwrap_or_default()).unwrap_or_else(|e| {
        eprintln!("tapir-floor: {e}");
        std::process::exit(2);
    });
    let dev = tun(name, with.vnet || with.vnethdr, !with.vnethdr)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let port: u16 = port.parse().expect("LISTEN_PORT: a port number");
    let mut peer: SocketAddr = peer.parse().expect("PEER_ADDR:PORT");
    let socket = if with.v6 {
        if let SocketAddr::V4(a) = peer {
            peer = SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port());
        }
        UdpSocket::bind(("::", port)).expect("bind")
    } else {
        UdpSocket::bind(("0.0.0.0", port)).expect("bind")
    };
    socket.set_nonblocking(true).expect("non-blocking");
    if with.connect {
        socket.connect(peer).expect("connect");
    }
    if with.gro {
        let on: libc::c_int = 1;
        let size = std::mem::size_of_val(&on) as libc::socklen_t;
        // SAFETY: setsockopt reads one live int.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_UDP,
                UDP_GRO,
                (&raw const on).cast(),
                size,
            )
        };
        check(r, "UDP_GRO");
    }
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[7; 32]).expect("key"));
    // The packet starts at HEADER; a virtio-net header, when there is
    // one, comes just before it.
    let vh = if with.vnet || with.vnethdr { VNET } else { 0 };
    let mut buf = vec![0u8; HEADER + 65536 + TAG];
    let mut sent: u64 = 0;
    if with.block {
        blocking(&dev, &socket, &key, peer, &with, vh);
    }
    let mut wait = if with.sig {
        sig_wait(dev.as_raw_fd(), socket.as_raw_fd())
    } else {
        Wait::new(
            with.epoll,
            with.poll4,
            with.idle.unwrap_or(2),
            with.spare,
            dev.as_raw_fd(),
            socket.as_raw_fd(),
        )
    };
    if let (true, Wait::Poll(_, _, ms)) = (with.timeout, &mut wait) {
        *ms = 1000;
    }
    loop {
        let [dev_ready, socket_ready] = wait.wait();
        if dev_ready {
            loop {
                let room = &mut buf[HEADER - vh..HEADER + 65536];
                // SAFETY: read writes at most room.len() bytes into room.
                let n =
                    unsafe { libc::read(dev.as_raw_fd(), room.as_mut_ptr().cast(), room.len()) };
                let Some(n) = usize::try_from(n).ok().and_then(|n| n.checked_sub(vh)) else {
                    break;
                };
                seal_and_send(&mut buf, n, &mut sent, &key, &socket, peer, with.connect);
            }
        }
        if socket_ready {
            while let Some(n) = receive(
                &socket,
                &mut buf,
                with.recvmsg,
                with.recvfrom,
                with.recvmsg0,
            ) {
                open_and_write(&mut buf, n, &key, dev.as_raw_fd(), vh);
            }
        }
    }
}

/// `block`: the device to the network on a thread of its own, blocked in
/// `read(2)`; the network to the device here, blocked in the receive.
fn blocking(
    dev: &OwnedFd,
    socket: &UdpSocket,
    key: &LessSafeKey,
    peer: SocketAddr,
    with: &With,
    vh: usize,
) -> ! {
    let fd = dev.as_raw_fd();
    // SAFETY: fcntl on a live descriptor, flags by value.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        check(
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK),
            "fcntl",
        );
    }
    socket.set_nonblocking(false).expect("blocking");
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut buf = vec![0u8; HEADER + 65536 + TAG];
            let mut sent: u64 = 0;
            loop {
                let room = &mut buf[HEADER - vh..HEADER + 65536];
                // SAFETY: read writes at most room.len() bytes into room.
                let n = unsafe { libc::read(fd, room.as_mut_ptr().cast(), room.len()) };
                if let Some(n) = usize::try_from(n).ok().and_then(|n| n.checked_sub(vh)) {
                    seal_and_send(&mut buf, n, &mut sent, key, socket, peer, with.connect);
                }
            }
        });
        let mut buf = vec![0u8; HEADER + 65536 + TAG];
        loop {
            if let Some(n) = receive(socket, &mut buf, with.recvmsg, with.recvfrom, with.recvmsg0) {
                open_and_write(&mut buf, n, key, fd, vh);
            }
        }
    })
}
