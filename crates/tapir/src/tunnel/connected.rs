//! A second UDP socket on the tunnel's port, connected to the endpoint of
//! its one peer (the usual client, a point-to-point link).
//!
//! A datagram sent on a connected socket takes the route the kernel keeps
//! for the socket, not one looked up for it; one received finds its socket
//! and its route at once (early demux), and needs no sender's address
//! copied out. Bound beside the tunnel's own socket, it hears that
//! endpoint alone once connected: the kernel gives a connected socket what
//! comes from its peer ahead of one bound to the port only, which goes on
//! hearing everyone else (handshakes from elsewhere, a peer that roamed).
//! `SO_REUSEPORT` lets it bind there, on it and on the sockets already on
//! the port (the tunnel's, and a connected one it replaces) for that bind
//! alone: the kernel lets a bind share a port where the first socket it
//! meets there has the option too, so none keeps it, and no other program
//! can bind the port after.
//!
//! Measured (`bench/ping.sh`, pinned to one CPU, 20 rounds of 200 pings):
//! the floor with a connected socket 25.93 µs against 27.14; the floor
//! used as tapir uses the kernel, 26.74 against 27.66. It is a socket of
//! the peer's family (IPv4 for an IPv4 peer, where the tunnel's own
//! socket takes both); what it receives between its bind and its connect
//! (anyone's datagrams of that family) is received as any datagram is,
//! its sender read as the kernel gives it.
//!
//! It goes on where the tunnel has one peer, whose endpoint is known, and
//! the host at most one global address of each family (where it has more,
//! answers must leave from where the peer wrote to, which the connected
//! socket's address, chosen at `connect`, need not be: see
//! `Outbox::take_host`). It is made afresh for a new endpoint, a new mark
//! or port, and when its local address is gone (a send refused for that,
//! or the host watcher's word); it goes off, an unbound socket under the
//! same descriptor that hears nothing, when the tunnel has more peers, or
//! none with a known endpoint, or the host more addresses. What waits in
//! it then, or when it is made again for the same endpoint, is received
//! first (`steer_connected`; not when the peer moved: what came from its
//! old endpoint would move it back). A send that
//! finds it not connected, or its address gone, goes by the tunnel's own
//! socket. Not for a tunnel run as another user (`User =`): root made the
//! tunnel's socket, and `SO_REUSEPORT` binds only beside a socket of the
//! same owner. `TAPIR_CONNECTED=off` keeps it off.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The socket and where it is connected.
pub(super) struct Connected {
    /// Bound to the tunnel's port and connected while on; an unbound socket
    /// (which hears nothing) while off. Replaced under the same descriptor,
    /// which the packet threads borrow.
    socket: UdpSocket,
    /// Where it is connected (`None`: off), taken by the senders when
    /// `version` moves.
    to: Mutex<Option<SocketAddrV6>>,
    /// Its local address, while on (the kernel's choice at `connect`).
    local: Mutex<Option<IpAddr>>,
    version: AtomicU64,
    /// A send on it failed: it is made again (or goes off) at the next look.
    stale: AtomicBool,
    /// Times it was connected (made afresh), and times that failed (no
    /// route to the peer, a port another socket holds), for `tapir status`.
    pub connects: AtomicU64,
    pub failures: AtomicU64,
    /// Receive buffer drops of the sockets it replaced.
    pub retired_drops: AtomicU64,
    /// See [`Connected::listed`].
    listed: AtomicBool,
}

fn unbound() -> io::Result<UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::IPV6,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    s.set_nonblocking(true)?;
    Ok(UdpSocket::from(s))
}

impl Connected {
    /// Off, to begin with.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            socket: unbound()?,
            to: Mutex::new(None),
            local: Mutex::new(None),
            version: AtomicU64::new(0),
            stale: AtomicBool::new(false),
            connects: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            retired_drops: AtomicU64::new(0),
            listed: AtomicBool::new(false),
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Where it is connected now.
    pub fn to(&self) -> Option<SocketAddrV6> {
        *self.to.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Its local address, while on.
    pub fn local(&self) -> Option<IpAddr> {
        *self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Goes up each time it is made, or goes off.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// A send on it failed.
    pub fn mark_stale(&self) {
        self.stale.store(true, Ordering::Relaxed);
    }

    /// Whether a send on it failed since the last call (its address gone).
    pub fn take_stale(&self) -> bool {
        self.stale.swap(false, Ordering::Relaxed)
    }

    /// Whether its local address was among the host's when it was made
    /// (only then does its absence later mean it is gone).
    pub fn listed(&self) -> bool {
        self.listed.load(Ordering::Relaxed)
    }

    pub fn set_listed(&self, listed: bool) {
        self.listed.store(listed, Ordering::Relaxed);
    }

    /// Connected to `to`, or off (`None`), as the tunnel now stands:
    /// `main` is the tunnel's socket (its port; `mark` and `gro` as on
    /// it). Made afresh where `to` or `renew` asks (a send found its
    /// address gone: see [`Connected::take_stale`]); `Err` (a socket that
    /// could not be made, no route to `to`) leaves it off, to be tried at
    /// the next look.
    pub fn steer(
        &self,
        main: &UdpSocket,
        to: Option<SocketAddrV6>,
        renew: bool,
        mark: u32,
        gro: bool,
    ) -> io::Result<()> {
        let now = self.to();
        if now == to && !(now.is_some() && renew) {
            return Ok(());
        }
        let made = match to {
            Some(to) => connected(main, self.socket.as_fd(), to, mark, gro),
            None => unbound(),
        };
        let (socket, to) = match made {
            Ok(s) => (s, to),
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                if now.is_some() {
                    // Off rather than connected to what it no longer should be.
                    self.replace(unbound()?, None)?;
                }
                return Err(e);
            }
        };
        if to.is_some() {
            self.connects.fetch_add(1, Ordering::Relaxed);
        }
        self.replace(socket, to)
    }

    fn replace(&self, socket: UdpSocket, to: Option<SocketAddrV6>) -> io::Result<()> {
        let local = to.and_then(|_| socket.local_addr().ok()).map(|a| a.ip());
        if self.to().is_some() {
            let drops = tapir_sys::mmsg::socket_drops(self.socket.as_fd()).unwrap_or(0);
            self.retired_drops.fetch_add(drops, Ordering::Relaxed);
        }
        tapir_sys::raw::replace(self.socket.as_fd(), OwnedFd::from(socket))?;
        *self.to.lock().unwrap_or_else(|e| e.into_inner()) = to;
        *self.local.lock().unwrap_or_else(|e| e.into_inner()) = local;
        self.version.fetch_add(1, Ordering::Release);
        Ok(())
    }
}

/// A socket bound beside `main` (and `old`, the connected socket it
/// replaces, if that is bound) and connected to `to`.
fn connected(
    main: &UdpSocket,
    old: BorrowedFd,
    to: SocketAddrV6,
    mark: u32,
    gro: bool,
) -> io::Result<UdpSocket> {
    let port = main.local_addr()?.port();
    // Of the peer's family (an IPv4 peer's datagrams through an IPv6
    // socket cost a ping 0.67 µs more, pinned: 28.23 µs against 27.56).
    let (domain, peer, here) = match to.ip().to_ipv4_mapped() {
        Some(v4) => (
            socket2::Domain::IPV4,
            SocketAddr::from((v4, to.port())),
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        ),
        None => (
            socket2::Domain::IPV6,
            SocketAddr::V6(to),
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
        ),
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if domain == socket2::Domain::IPV6 {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    if mark != 0 {
        s.set_mark(mark)?;
    }
    // Every socket on the port takes SO_REUSEPORT for this bind, and drops
    // it at once (see the module's doc): a later bind to the port by
    // anyone is refused again.
    let (m, o) = (socket2::SockRef::from(main), socket2::SockRef::from(&old));
    let bound = [&m, &o, &socket2::SockRef::from(&s)]
        .iter()
        .try_for_each(|x| x.set_reuse_port(true))
        .and_then(|()| s.bind(&here.into()));
    let undone = [&m, &o, &socket2::SockRef::from(&s)]
        .iter()
        .map(|x| x.set_reuse_port(false))
        .fold(Ok(()), io::Result::and);
    bound?;
    undone?;
    s.connect(&peer.into())?;
    let s = UdpSocket::from(s);
    tapir_sys::mmsg::set_buffer_sizes(s.as_fd(), super::SOCKET_BUFFER);
    if gro {
        tapir_sys::mmsg::enable_gro(s.as_fd());
    }
    Ok(s)
}

/// A sender's copy of where the socket is connected.
#[derive(Default)]
pub(super) struct Seen {
    version: u64,
    to: Option<SocketAddrV6>,
}

impl Seen {
    /// Where `c` is connected, as last published.
    #[inline]
    pub fn to(&mut self, c: &Connected) -> Option<SocketAddrV6> {
        let v = c.version.load(Ordering::Acquire);
        if v != self.version {
            self.to = c.to();
            self.version = v;
        }
        self.to
    }
}
