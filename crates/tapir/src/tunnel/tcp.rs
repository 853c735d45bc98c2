//! The TCP transport: WireGuard messages over TCP connections, each behind
//! a 16-bit big-endian length (udp2tcp's framing, `tapir_wire::tcpframe`).
//!
//! ```text
//!   listener ──accept──▶ pending conn ──first authenticated message──▶ a peer's conn
//!   dial (a peer's configured endpoint) ──connect──▶ open ──EOF/RST/timeout──▶ waiting (backoff) ──▶ connect
//!   receive(rx batch): frames from every readable conn, copied into slots, `from` = the conn's remote address
//!   send(tx batch):    each datagram appended to the queue of the conn whose remote address is its `to`
//! ```
//! The sans-IO tunnel never sees a connection: it sees the remote address of
//! the one a message came on, and moves a peer's endpoint there only once
//! the message authenticates, as with UDP roaming. So an unauthenticated
//! connection never receives a peer's traffic. Everything is bounded: the
//! unauthenticated connections (a cap, the oldest closed first, and a
//! deadline), each connection's send queue (full: the packet is dropped and
//! counted, as a full UDP socket buffer would; the tunnelled TCP needs loss,
//! not delay), and each connection's receive buffer (a frame that cannot be
//! a WireGuard message closes that connection only).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tapir_proto::wg::keys::PublicKey;
use tapir_proto::wg::ratelimit::host_of;
use tapir_sys::mmsg::Batch;
use tapir_sys::poll::PollSet;
use tapir_wire::tcpframe::{self, Deframer};

use super::{from_v6, to_v6};

/// Unauthenticated connections kept at once; beyond it the oldest of the
/// source that holds the most is closed.
pub const MAX_PENDING: usize = 64;
/// Unauthenticated connections kept at once from one source (an IPv4
/// address, an IPv6 /64); beyond it its own oldest is closed. So one host
/// flooding the listener pushes out only its own connections, and a
/// client's connection waiting for its handshake stays.
pub const MAX_PENDING_PER_SOURCE: usize = 8;
/// How long a connection may stay unauthenticated.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// How long a connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection whose sent data stays unacknowledged this long, or whose
/// peer answers no keepalive probe for as long, is given up by the kernel
/// (`TCP_USER_TIMEOUT`, TCP keepalive), and the client dials again. Without
/// it, a path that died silently (a laptop's new address, a middlebox that
/// lost the flow) left the tunnel stalled and "connected" until the kernel
/// gave up on its own, some 15 minutes later; OpenVPN's ping-restart is the
/// same idea.
pub const DEAD_AFTER: Duration = Duration::from_secs(30);
/// Idle this long, a connection is probed (then every [`PROBE_EVERY`]).
pub const PROBE_AFTER: Duration = Duration::from_secs(15);
/// See [`PROBE_AFTER`].
pub const PROBE_EVERY: Duration = Duration::from_secs(5);

/// Sets a connection's liveness checks (see [`DEAD_AFTER`]).
fn liveness(socket: socket2::SockRef<'_>) -> io::Result<()> {
    socket.set_tcp_user_timeout(Some(DEAD_AFTER))?;
    socket.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(PROBE_AFTER)
            .with_interval(PROBE_EVERY)
            .with_retries(3),
    )
}

/// Bytes queued per connection before packets are dropped.
pub const SEND_QUEUE: usize = 512 * 1024;
/// The first and the longest wait before reconnecting.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// See [`BACKOFF_MIN`].
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The wait before reconnect attempt `failures + 1`: doubling from 1 s,
/// at most 30 s, and up to a fifth longer at random (`jitter` in 0..=255) so
/// that many clients of one server do not reconnect in step.
pub fn backoff(failures: u32, jitter: u8) -> Duration {
    let base = BACKOFF_MIN.saturating_mul(1u32 << failures.min(5));
    let extra = base.mul_f64(f64::from(jitter) / 255.0 / 5.0);
    (base + extra).min(BACKOFF_MAX)
}

/// Counters of the transport, shown by `tapir status`.
#[derive(Debug, Clone, Default)]
pub struct TcpStats {
    /// Connections accepted.
    pub accepted: u64,
    /// Unauthenticated connections closed to make room, or at their deadline.
    pub pending_closed: u64,
    /// Connections closed for a frame that cannot be a WireGuard message.
    pub bad_frames: u64,
    /// Datagrams dropped: the connection's send queue was full.
    pub queue_full: u64,
    /// Datagrams dropped: no open connection to their destination.
    pub no_connection: u64,
    /// Accepted connections closed because their peer authenticated on a newer one.
    pub replaced: u64,
}

/// Where a dialled endpoint stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialState {
    /// A connect is under way.
    Connecting,
    /// Connected.
    Open,
    /// Waiting to reconnect.
    Waiting {
        /// When the next attempt starts.
        until: Instant,
    },
}

struct Dial {
    addr: SocketAddr,
    state: DialState,
    failures: u32,
    conn: Option<usize>,
    last_error: Option<String>,
    /// What the log last said of it: up (`Some(true)`), down, or nothing
    /// yet; it speaks once a change, not once an attempt.
    said_up: Option<bool>,
    /// Attempts that failed since the last change said (a connection lost,
    /// or up): the first of a series is said, and every tenth after.
    failed_since: u32,
}

struct Conn {
    stream: TcpStream,
    remote: SocketAddr,
    /// Its local address (as the host names it: IPv4 unmapped).
    local: Option<IpAddr>,
    deframer: Deframer,
    out: Vec<u8>,
    out_at: usize,
    connecting: bool,
    authenticated: bool,
    /// The peer that authenticated on it (an accepted connection: its only one).
    owner: Option<PublicKey>,
    opened: Instant,
    dial: Option<usize>,
    readable: bool,
    /// Its place in the poll set, and whether it waits there for writing.
    place: Option<(usize, bool)>,
}

impl Conn {
    /// Waited on for writing too: connecting, or with bytes to send.
    fn wants_write(&self) -> bool {
        self.connecting || self.out_at < self.out.len()
    }
}

/// A read of fewer bytes than this that leaves room in the buffer is taken
/// to have emptied the socket (see [`TcpTransport::receive`]): a few small
/// messages' worth.
const LONE_READ: usize = 2048;

/// Listener, connections and dials of one tunnel.
pub struct TcpTransport {
    listener: Option<TcpListener>,
    conns: Vec<Option<Conn>>,
    by_remote: HashMap<SocketAddr, usize>,
    /// The last look-up in `by_remote` (cleared when it changes): most
    /// messages go to and come from the connection the last one did, and
    /// hashing an address costs more than the rest of a message's
    /// bookkeeping here.
    last_remote: Option<(SocketAddr, usize)>,
    /// Connections a send queued bytes on (kept for its memory).
    touched: Vec<usize>,
    dials: Vec<Dial>,
    max_message: usize,
    /// The listener's place in the poll set (each connection keeps its own).
    listener_at: Option<usize>,
    /// Places in the poll set of connections closed since the last
    /// [`TcpTransport::sync`], to take out there; and places free to reuse.
    released: Vec<usize>,
    free_places: Vec<usize>,
    jitter: u64,
    /// Counters.
    pub stats: TcpStats,
    /// Endpoints connected since the last [`TcpTransport::take_connected`].
    connected: Vec<SocketAddr>,
    /// Where the next receive pass starts.
    next_rx: usize,
    /// accept() failed for want of descriptors: the listener rests until then.
    accept_paused_until: Option<Instant>,
    /// The firewall mark on our connections (policy routing keeps them off the tunnel).
    mark: Option<u32>,
    /// Datagrams dropped here, not sent: (destination, bytes), for the
    /// peer's transfer count to leave out (as the kernel counts only what
    /// it sent).
    pub unsent: Vec<(SocketAddr, usize)>,
    /// What the log should say of the dialed connections (lost, connected
    /// again, the first failure of a series), for the tunnel to print.
    pub events: Vec<String>,
}

/// At most this many log lines wait in [`TcpTransport::events`].
const EVENTS_KEPT: usize = 64;

fn nonblocking_connect(addr: SocketAddr, mark: Option<u32>) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_only_v6(false)?;
    if let Some(m) = mark {
        socket.set_mark(m)?;
    }
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    liveness(socket2::SockRef::from(&socket))?;
    match socket.connect(&SocketAddr::V6(to_v6(addr)).into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(socket.into())
}

impl TcpTransport {
    /// Marks the connections made from now on, and those accepted (the
    /// listener's mark is inherited), with firewall mark `mark`.
    pub fn set_mark(&mut self, mark: u32) -> io::Result<()> {
        if let Some(l) = &self.listener {
            socket2::SockRef::from(l).set_mark(mark)?;
        }
        self.mark = Some(mark);
        Ok(())
    }

    /// A transport that listens on `[::]:port` when `listen` is given, and
    /// accepts messages of up to `max_message` bytes.
    pub fn new(listen: Option<u16>, max_message: usize, seed: u64) -> io::Result<Self> {
        let listener = match listen {
            Some(port) => {
                let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
                socket.set_only_v6(false)?;
                socket.set_reuse_address(true)?;
                socket.bind(&SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port).into())?;
                socket.listen(128)?;
                socket.set_nonblocking(true)?;
                Some(TcpListener::from(socket))
            }
            None => None,
        };
        Ok(Self {
            listener,
            conns: Vec::new(),
            by_remote: HashMap::new(),
            last_remote: None,
            touched: Vec::new(),
            unsent: Vec::new(),
            events: Vec::new(),
            dials: Vec::new(),
            max_message,
            listener_at: None,
            released: Vec::new(),
            free_places: Vec::new(),
            jitter: seed | 1,
            stats: TcpStats::default(),
            connected: Vec::new(),
            next_rx: 0,
            accept_paused_until: None,
            mark: None,
        })
    }

    /// The port listened on (0 without a listener).
    pub fn local_port(&self) -> u16 {
        self.listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map_or(0, |a| a.port())
    }

    fn next_jitter(&mut self) -> u8 {
        self.jitter ^= self.jitter << 13;
        self.jitter ^= self.jitter >> 7;
        self.jitter ^= self.jitter << 17;
        self.jitter as u8
    }

    /// Keeps a connection to each of `addrs` (the peers' configured
    /// endpoints): new ones are dialled now, ones no longer wanted closed.
    pub fn set_dials(&mut self, addrs: &[SocketAddr], now: Instant) {
        let gone: Vec<usize> = (0..self.dials.len())
            .filter(|&i| !addrs.contains(&self.dials[i].addr))
            .collect();
        for &i in gone.iter().rev() {
            if let Some(c) = self.dials[i].conn.take() {
                // Ours to drop (the endpoint changed, the peer went): not
                // a connection lost, nor an attempt that failed (the dial,
                // no longer its, is left alone by `close`).
                self.dials[i].said_up = Some(false);
                self.close(c, now, None);
            }
            self.dials.remove(i);
            for c in self.conns.iter_mut().flatten() {
                match c.dial {
                    Some(d) if d == i => c.dial = None,
                    Some(d) if d > i => c.dial = Some(d - 1),
                    _ => {}
                }
            }
        }
        for a in addrs {
            if !self.dials.iter().any(|d| d.addr == *a) {
                self.dials.push(Dial {
                    addr: *a,
                    state: DialState::Waiting { until: now },
                    failures: 0,
                    conn: None,
                    last_error: None,
                    said_up: None,
                    failed_since: 0,
                });
            }
        }
        self.run_dials(now);
    }

    fn run_dials(&mut self, now: Instant) {
        for i in 0..self.dials.len() {
            let DialState::Waiting { until } = self.dials[i].state else {
                continue;
            };
            if now < until {
                continue;
            }
            let addr = self.dials[i].addr;
            match nonblocking_connect(addr, self.mark) {
                Ok(stream) => {
                    let id = self.insert(stream, addr, now, Some(i), true);
                    self.dials[i].conn = Some(id);
                    self.dials[i].state = DialState::Connecting;
                }
                Err(e) => {
                    self.attempt_failed(i, &e.to_string());
                    self.dials[i].last_error = Some(e.to_string());
                    self.wait(i, now);
                }
            }
        }
    }

    /// An attempt of dial `d` failed: said if it is the first since the
    /// last change (a connection lost, or up), and every tenth after (after
    /// a loss, the attempts that failed were never said).
    fn attempt_failed(&mut self, d: usize, why: &str) {
        let dial = &mut self.dials[d];
        dial.said_up = Some(false);
        dial.failed_since = dial.failed_since.saturating_add(1);
        let (addr, n) = (dial.addr, dial.failed_since);
        if n == 1 {
            self.event(format!(
                "cannot connect to {addr}: {why}; trying again, each wait longer (tapir status shows the attempts)"
            ));
        } else if n % 10 == 0 {
            self.event(format!(
                "still cannot connect to {addr} after {n} attempts: {why}; trying again"
            ));
        }
    }

    fn wait(&mut self, dial: usize, now: Instant) {
        let j = self.next_jitter();
        let d = &mut self.dials[dial];
        d.conn = None;
        d.state = DialState::Waiting {
            until: now + backoff(d.failures, j),
        };
        d.failures = d.failures.saturating_add(1);
    }

    fn insert(
        &mut self,
        stream: TcpStream,
        remote: SocketAddr,
        now: Instant,
        dial: Option<usize>,
        connecting: bool,
    ) -> usize {
        let local = stream.local_addr().ok().map(|a| a.ip().to_canonical());
        let conn = Conn {
            stream,
            remote,
            local,
            deframer: Deframer::new(self.max_message),
            out: Vec::new(),
            out_at: 0,
            connecting,
            authenticated: false,
            owner: None,
            opened: now,
            dial,
            readable: false,
            place: None,
        };
        let id = match self.conns.iter().position(Option::is_none) {
            Some(free) => {
                self.conns[free] = Some(conn);
                free
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        };
        // A newer connection from the same address (a reconnect) takes over,
        // authenticated or not: the kernel accepts one with the same address
        // and port only once the old one is gone on its side (a SYN for a
        // live connection is answered with an ACK and reset by the sender),
        // so what it replaces is dead even if its EOF is still unread.
        self.last_remote = None;
        if let Some(old) = self.by_remote.insert(remote, id) {
            if old != id {
                self.close(old, now, None);
                self.by_remote.insert(remote, id);
            }
        }
        id
    }

    /// The connection `by_remote` names for `addr`.
    fn conn_of(&mut self, addr: SocketAddr) -> Option<usize> {
        match self.last_remote {
            Some((a, id)) if a == addr => Some(id),
            _ => {
                let id = *self.by_remote.get(&addr)?;
                self.last_remote = Some((addr, id));
                Some(id)
            }
        }
    }

    fn close(&mut self, id: usize, now: Instant, why: Option<String>) {
        let Some(conn) = self.conns.get_mut(id).and_then(Option::take) else {
            return;
        };
        if let Some((place, _)) = conn.place {
            self.released.push(place);
        }
        if self.by_remote.get(&conn.remote) == Some(&id) {
            self.by_remote.remove(&conn.remote);
            self.last_remote = None;
        }
        if let Some(d) = conn.dial.filter(|&d| d < self.dials.len()) {
            if self.dials[d].conn == Some(id) {
                // Said once a change: a connection lost, or the first of
                // the attempts that fail (as OpenVPN logs a restart).
                let said = why.as_deref().unwrap_or("closed by the other end");
                if conn.connecting {
                    self.attempt_failed(d, said);
                } else if self.dials[d].said_up != Some(false) {
                    self.dials[d].said_up = Some(false);
                    self.dials[d].failed_since = 0;
                    self.event(format!(
                        "connection to {} lost: {said}; connecting again",
                        conn.remote
                    ));
                }
                if why.is_some() {
                    self.dials[d].last_error = why;
                }
                self.wait(d, now);
            }
        }
    }

    fn event(&mut self, line: String) {
        if self.events.len() < EVENTS_KEPT {
            self.events.push(line);
        }
    }

    /// Brings `set` up to date with the listener and the connections: what
    /// changed since the last call, and only that, goes in or out (a
    /// connection that came, went, or waits to write now or no longer), so
    /// a connection accepted or closed costs one or two system calls, not
    /// two for every open connection (a flood of connections against a
    /// server with many peers would otherwise hold its packet thread).
    pub fn sync(&mut self, set: &mut PollSet, now: Instant) {
        // Out first: a new connection may have the descriptor number of
        // one closed since, and must not be taken out in its place.
        for place in self.released.drain(..) {
            set.set_ignored(place, true);
            self.free_places.push(place);
        }
        if let Some(l) = &self.listener {
            let at = *self
                .listener_at
                .get_or_insert_with(|| set.add(l.as_fd(), true, false));
            set.set_ignored(at, self.accept_paused_until.is_some_and(|t| now < t));
        }
        let free = &mut self.free_places;
        for c in self.conns.iter_mut().flatten() {
            let write = c.wants_write();
            match c.place {
                None => {
                    let at = match free.pop() {
                        Some(at) => {
                            set.reuse(at, c.stream.as_fd(), true, write);
                            at
                        }
                        None => set.add(c.stream.as_fd(), true, write),
                    };
                    c.place = Some((at, write));
                }
                Some((at, was)) if was != write => {
                    set.modify(at, true, write);
                    c.place = Some((at, write));
                }
                Some(_) => {}
            }
        }
    }

    /// The poll set was emptied: everything goes in again at the next
    /// [`TcpTransport::sync`].
    pub fn forget_places(&mut self) {
        self.listener_at = None;
        self.released.clear();
        self.free_places.clear();
        for c in self.conns.iter_mut().flatten() {
            c.place = None;
        }
    }

    /// Acts on what `set` reported: accepts, finished connects, writes.
    pub fn service(&mut self, set: &PollSet, now: Instant) {
        if self.listener_at.is_some_and(|i| set.readable(i)) {
            self.accept(now);
        }
        for id in 0..self.conns.len() {
            // Those accepted just now are not in the set yet.
            let Some((at, _)) = self.conns[id].as_ref().and_then(|c| c.place) else {
                continue;
            };
            let (readable, writable) = (set.readable(at), set.writable(at));
            let Some(c) = self.conns.get_mut(id).and_then(Option::as_mut) else {
                continue;
            };
            if c.connecting && writable {
                match c.stream.take_error() {
                    Ok(None) if c.stream.peer_addr().is_ok() => {
                        c.connecting = false;
                        let remote = c.remote;
                        if let Some(d) = c.dial {
                            self.dials[d].state = DialState::Open;
                            self.dials[d].last_error = None;
                            if self.dials[d].said_up != Some(true) {
                                self.dials[d].said_up = Some(true);
                                self.dials[d].failed_since = 0;
                                self.event(format!("connected to {remote}"));
                            }
                        }
                        self.connected.push(remote);
                    }
                    Ok(e) => {
                        let why = e.map_or("connection refused".into(), |e| e.to_string());
                        self.close(id, now, Some(why));
                        continue;
                    }
                    Err(e) => {
                        self.close(id, now, Some(e.to_string()));
                        continue;
                    }
                }
            }
            let Some(c) = self.conns.get_mut(id).and_then(Option::as_mut) else {
                continue;
            };
            if readable && !c.connecting {
                c.readable = true;
            }
            if writable && !c.connecting {
                self.flush(id, now);
            }
        }
    }

    fn accept(&mut self, now: Instant) {
        let Some(listener) = self.listener.as_ref() else {
            return;
        };
        let mut accepted = Vec::new();
        for _ in 0..64 {
            match listener.accept() {
                Ok((s, from)) => accepted.push((s, from)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    // Out of descriptors (EMFILE) or the like: the
                    // listener stays readable, so rest it a moment
                    // instead of spinning on it.
                    self.accept_paused_until = Some(now + Duration::from_millis(100));
                    break;
                }
            }
        }
        for (stream, from) in accepted {
            if stream.set_nonblocking(true).is_err()
                || stream.set_nodelay(true).is_err()
                || liveness(socket2::SockRef::from(&stream)).is_err()
            {
                continue;
            }
            self.stats.accepted += 1;
            let from = from_v6(from);
            if let Some(room) = self.room_for(host_of(from.ip())) {
                self.stats.pending_closed += 1;
                self.close(room, now, None);
            }
            self.insert(stream, from, now, None, false);
        }
    }

    /// The unauthenticated connection to close for a newcomer from `from`,
    /// if one must go: its source's oldest once that source holds
    /// [`MAX_PENDING_PER_SOURCE`]; otherwise, once [`MAX_PENDING`] wait in
    /// all, the oldest of the source that holds the most.
    fn room_for(&self, from: IpAddr) -> Option<usize> {
        let mut by_source: HashMap<IpAddr, (usize, Instant, usize)> = HashMap::new();
        let mut all = 0;
        for (i, c) in self.conns.iter().enumerate() {
            let Some(c) = c.as_ref().filter(|c| !c.authenticated && c.dial.is_none()) else {
                continue;
            };
            all += 1;
            let e = by_source
                .entry(host_of(c.remote.ip()))
                .or_insert((0, c.opened, i));
            e.0 += 1;
            if c.opened < e.1 {
                (e.1, e.2) = (c.opened, i);
            }
        }
        if let Some(&(n, _, oldest)) = by_source.get(&from) {
            if n >= MAX_PENDING_PER_SOURCE {
                return Some(oldest);
            }
        }
        if all < MAX_PENDING {
            return None;
        }
        by_source
            .values()
            .max_by_key(|&&(n, opened, _)| (n, std::cmp::Reverse(opened)))
            .map(|&(_, _, oldest)| oldest)
    }

    fn flush(&mut self, id: usize, now: Instant) {
        let Some(c) = self.conns.get_mut(id).and_then(Option::as_mut) else {
            return;
        };
        while c.out_at < c.out.len() {
            match c.stream.write(&c.out[c.out_at..]) {
                Ok(0) => break,
                Ok(n) => c.out_at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.close(id, now, Some(e.to_string()));
                    return;
                }
            }
        }
        if c.out_at == c.out.len() {
            c.out.clear();
            c.out_at = 0;
        } else if c.out_at > SEND_QUEUE / 2 {
            c.out.drain(..c.out_at);
            c.out_at = 0;
        }
    }

    /// Queues datagrams `0..n` of `tx` on their connections and writes what
    /// the sockets take now.
    pub fn send(&mut self, tx: &Batch, n: usize, now: Instant) {
        let mut touched = std::mem::take(&mut self.touched);
        touched.clear();
        for i in 0..n {
            let (bytes, to) = tx.outgoing(i);
            let to = from_v6(SocketAddr::V6(to));
            let Some(id) = self.conn_of(to) else {
                self.stats.no_connection += 1;
                self.unsent.push((to, bytes.len()));
                continue;
            };
            let Some(c) = self.conns[id].as_mut().filter(|c| !c.connecting) else {
                self.stats.no_connection += 1;
                self.unsent.push((to, bytes.len()));
                continue;
            };
            let Some(header) = tcpframe::header(bytes.len()) else {
                continue;
            };
            if c.out.len() - c.out_at + 2 + bytes.len() > SEND_QUEUE {
                self.stats.queue_full += 1;
                self.unsent.push((to, bytes.len()));
                continue;
            }
            c.out.extend_from_slice(&header);
            c.out.extend_from_slice(bytes);
            if !touched.contains(&id) {
                touched.push(id);
            }
        }
        for &id in &touched {
            self.flush(id, now);
        }
        self.touched = touched;
    }

    /// Copies whole messages from readable connections into `rx`'s slots,
    /// each with its connection's remote address; returns how many. Frames
    /// that did not fit stay buffered ([`TcpTransport::has_input`]).
    pub fn receive(&mut self, rx: &mut Batch, now: Instant) -> usize {
        let mut k = 0;
        let cap = rx.capacity();
        // Round robin: each pass starts where the last one stopped, so one
        // busy connection cannot keep the others waiting.
        let count = self.conns.len();
        let first = self.next_rx % count.max(1);
        for id in (first..count).chain(0..first) {
            if k == cap {
                self.next_rx = id;
                break;
            }
            let Some(c) = self.conns[id].as_mut() else {
                continue;
            };
            if c.connecting {
                continue;
            }
            let mut close: Option<Option<String>> = None;
            let mut bad = false;
            'conn: loop {
                loop {
                    match c.deframer.next_frame() {
                        Ok(Some(m)) => {
                            let slot = rx.slot_mut(k);
                            if m.len() > slot.len() {
                                continue;
                            }
                            slot[..m.len()].copy_from_slice(m);
                            let len = m.len();
                            rx.set_received(k, len, &to_v6(c.remote));
                            k += 1;
                            if k == cap {
                                break 'conn;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            bad = true;
                            close = Some(Some(format!("closed: {e}")));
                            break 'conn;
                        }
                    }
                }
                if !c.readable {
                    break;
                }
                let space = c.deframer.space();
                match c.stream.read(space) {
                    Ok(0) => {
                        close = Some(Some("closed by the other end".into()));
                        break;
                    }
                    Ok(n) => {
                        // A small read that did not fill the space emptied
                        // the socket (a ping, an ACK): the next read would
                        // find nothing, a system call for EAGAIN; what
                        // comes meanwhile makes the next poll report it
                        // readable again. A stream under load is read on:
                        // more arrives while it is read (one TCP stream
                        // through the tunnel moved 3% less when every
                        // short read went back to poll).
                        if n < space.len() && n < LONE_READ {
                            c.readable = false;
                        }
                        c.deframer.filled(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        c.readable = false;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        close = Some(Some(e.to_string()));
                        break;
                    }
                }
            }
            if bad {
                self.stats.bad_frames += 1;
            }
            if let Some(why) = close {
                self.close(id, now, why);
            }
        }
        k
    }

    /// Whether some connection holds input not yet handed out (poll without waiting).
    pub fn has_input(&self) -> bool {
        // A whole frame waiting, or unread bytes: half a frame is not
        // input (waking for it would spin until the rest arrives).
        self.conns
            .iter()
            .flatten()
            .any(|c| !c.connecting && (c.readable || c.deframer.has_frame()))
    }

    /// The connection `from` carried a message that authenticated; `true`
    /// the first time (then say whose it is: [`TcpTransport::owned_by`]).
    pub fn authenticated(&mut self, from: SocketAddr) -> bool {
        if let Some(c) = self.conn_of(from).and_then(|id| self.conns[id].as_mut()) {
            if !c.authenticated {
                c.authenticated = true;
                if let Some(d) = c.dial {
                    self.dials[d].failures = 0;
                }
                return true;
            }
        }
        false
    }

    /// The accepted connection from `from` is `peer`'s: any other accepted
    /// connection of that peer is closed. A peer is sent to on its newest
    /// (its endpoint), so an older one only holds a descriptor; and a peer,
    /// however valid its key, cannot hold more than one, where it could
    /// authenticate one every 20 ms and run the process out of descriptors.
    pub fn owned_by(&mut self, from: SocketAddr, peer: PublicKey, now: Instant) {
        let Some(id) = self.conn_of(from) else {
            return;
        };
        match self.conns[id].as_mut() {
            Some(c) if c.dial.is_none() => c.owner = Some(peer),
            _ => return,
        }
        let older: Vec<usize> = self
            .conns
            .iter()
            .enumerate()
            .filter(|&(i, c)| {
                i != id
                    && c.as_ref()
                        .is_some_and(|c| c.dial.is_none() && c.owner == Some(peer))
            })
            .map(|(i, _)| i)
            .collect();
        for i in older {
            self.stats.replaced += 1;
            self.close(i, now, None);
        }
    }

    /// Closes every connection from a local address the host had on an
    /// interface at the last look (`before`) and has no longer (`now_has`):
    /// nothing it sends can leave, and it would wait for [`DEAD_AFTER`] to be
    /// given up. A dialed one is dialed again, from an address the host has.
    /// Addresses on no interface (the rest of 127/8, `ip route add local`
    /// ranges) are never in `before`: their connections stay. Returns how
    /// many it closed.
    pub fn close_orphans(&mut self, before: &[IpAddr], now_has: &[IpAddr], now: Instant) -> usize {
        if now_has.is_empty() {
            return 0;
        }
        let mut closed = 0;
        for id in 0..self.conns.len() {
            let gone = self.conns[id]
                .as_ref()
                .and_then(|c| c.local)
                .filter(|ip| before.contains(ip) && !now_has.contains(ip));
            if let Some(ip) = gone {
                self.close(id, now, Some(format!("its local address {ip} went away")));
                closed += 1;
            }
        }
        closed
    }

    /// Endpoints whose connection opened since the last call (the tunnel
    /// handshakes over each at once: whatever was sent before is lost).
    pub fn take_connected(&mut self) -> Vec<SocketAddr> {
        std::mem::take(&mut self.connected)
    }

    /// Deadlines: unauthenticated and idle connections closed, slow connects
    /// abandoned, waiting dials started.
    pub fn handle_timeout(&mut self, now: Instant) {
        for id in 0..self.conns.len() {
            let Some(c) = self.conns[id].as_ref() else {
                continue;
            };
            // (A peer's connection that is only idle stays, as the kernel's
            // WireGuard and OpenVPN keep an idle peer: a dead one is found
            // by TCP keepalive and TCP_USER_TIMEOUT, and a peer that moved
            // to another connection has its older one closed then.)
            let age = now.saturating_duration_since(c.opened);
            if c.connecting && age >= CONNECT_TIMEOUT {
                self.close(id, now, Some("connect timed out".into()));
            } else if c.dial.is_none() && !c.authenticated && age >= HANDSHAKE_DEADLINE {
                self.stats.pending_closed += 1;
                self.close(id, now, None);
            }
        }
        self.run_dials(now);
    }

    /// When [`TcpTransport::handle_timeout`] next has work.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let resting = self.accept_paused_until.filter(|t| now < *t);
        let dials = self.dials.iter().filter_map(|d| match d.state {
            DialState::Waiting { until } => Some(until),
            _ => None,
        });
        let conns = self.conns.iter().flatten().filter_map(|c| {
            if c.connecting {
                Some(c.opened + CONNECT_TIMEOUT)
            } else if c.dial.is_none() && !c.authenticated {
                Some(c.opened + HANDSHAKE_DEADLINE)
            } else {
                None
            }
        });
        dials.chain(conns).chain(resting).min().map(|t| t.max(now))
    }

    /// The state of the dial to `addr`, its failures in a row and its last error.
    pub fn dial_state(&self, addr: SocketAddr) -> Option<(DialState, u32, Option<&str>)> {
        self.dials
            .iter()
            .find(|d| d.addr == addr)
            .map(|d| (d.state, d.failures, d.last_error.as_deref()))
    }

    /// Whether an open connection leads to `addr`.
    pub fn connected_to(&self, addr: SocketAddr) -> bool {
        self.by_remote
            .get(&addr)
            .and_then(|&id| self.conns[id].as_ref())
            .is_some_and(|c| !c.connecting)
    }

    /// Open connections, and how many of them have not authenticated.
    pub fn connection_counts(&self) -> (usize, usize) {
        let open = self.conns.iter().flatten().count();
        let pending = self
            .conns
            .iter()
            .flatten()
            .filter(|c| !c.authenticated && c.dial.is_none())
            .count();
        (open, pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_to_thirty_with_jitter() {
        assert_eq!(backoff(0, 0), Duration::from_secs(1));
        assert_eq!(backoff(1, 0), Duration::from_secs(2));
        assert_eq!(backoff(4, 0), Duration::from_secs(16));
        assert_eq!(backoff(5, 0), Duration::from_secs(30));
        assert_eq!(backoff(40, 255), Duration::from_secs(30));
        assert_eq!(backoff(0, 255), Duration::from_millis(1200));
        assert!(backoff(3, 128) > backoff(3, 0));
    }

    #[test]
    fn connections_both_ways_give_up_a_silent_peer_in_seconds() {
        let now = Instant::now();
        let mut server = TcpTransport::new(Some(0), 2048, 1).unwrap();
        let port = server.local_port();
        let dialed = nonblocking_connect(SocketAddr::from(([127, 0, 0, 1], port)), None).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        server.accept(now);
        let accepted = server.conns.iter().flatten().next().expect("accepted");
        for s in [
            socket2::SockRef::from(&dialed),
            socket2::SockRef::from(&accepted.stream),
        ] {
            assert_eq!(s.tcp_user_timeout().unwrap(), Some(DEAD_AFTER));
            assert!(s.keepalive().unwrap());
            assert_eq!(s.tcp_keepalive_time().unwrap(), PROBE_AFTER);
            assert_eq!(s.tcp_keepalive_interval().unwrap(), PROBE_EVERY);
        }
    }

    /// A connection to the loopback listener at `port` from address `ip`.
    fn connect_from(ip: [u8; 4], port: u16) -> TcpStream {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        s.bind(&SocketAddr::from((ip, 0)).into()).unwrap();
        s.connect(&SocketAddr::from(([127, 0, 0, 1], port)).into())
            .unwrap();
        s.into()
    }

    #[test]
    fn a_flood_from_one_source_pushes_out_only_its_own_connections() {
        let now = Instant::now();
        let mut server = TcpTransport::new(Some(0), 2048, 1).unwrap();
        let port = server.local_port();
        let client = connect_from([127, 0, 2, 1], port);
        let client_addr = client.local_addr().unwrap();
        for _ in 0..10 {
            pump(&mut server, now);
        }
        // Then one host opens 100 connections and sends nothing.
        let flood: Vec<TcpStream> = (0..100)
            .map(|_| connect_from([127, 0, 2, 2], port))
            .collect();
        for _ in 0..30 {
            pump(&mut server, now);
        }
        assert_eq!(server.stats.accepted, 101);
        assert!(server.connected_to(client_addr), "the client's stays");
        assert_eq!(
            server.connection_counts(),
            (1 + MAX_PENDING_PER_SOURCE, 1 + MAX_PENDING_PER_SOURCE)
        );
        drop((client, flood));
    }

    #[test]
    fn a_peer_keeps_one_accepted_connection_its_newest() {
        let now = Instant::now();
        let mut server = TcpTransport::new(Some(0), 2048, 1).unwrap();
        let port = server.local_port();
        let conns: Vec<TcpStream> = (1..=3)
            .map(|i| connect_from([127, 0, 3, i], port))
            .collect();
        for _ in 0..10 {
            pump(&mut server, now);
        }
        let addr = |i: usize| conns[i].local_addr().unwrap();
        let (one, two) = (
            tapir_proto::wg::keys::PrivateKey::from_random([1; 32]).public_key(),
            tapir_proto::wg::keys::PrivateKey::from_random([2; 32]).public_key(),
        );
        assert!(server.authenticated(addr(0)));
        server.owned_by(addr(0), one, now);
        assert!(!server.authenticated(addr(0)), "once");
        assert!(server.authenticated(addr(1)));
        server.owned_by(addr(1), two, now);
        // Peer one again, on its third connection: its first goes.
        assert!(server.authenticated(addr(2)));
        server.owned_by(addr(2), one, now);
        assert!(!server.connected_to(addr(0)));
        assert!(server.connected_to(addr(1)) && server.connected_to(addr(2)));
        assert_eq!(server.stats.replaced, 1);
        assert_eq!(server.connection_counts(), (2, 0));
        drop(conns);
    }

    fn pump(a: &mut TcpTransport, now: Instant) {
        let mut set = PollSet::new();
        a.forget_places();
        a.sync(&mut set, now);
        set.wait(Duration::from_millis(20)).unwrap();
        a.service(&set, now);
    }

    #[test]
    fn a_kept_set_follows_connections_one_change_at_a_time() {
        let now = Instant::now();
        let mut server = TcpTransport::new(Some(0), 2048, 1).unwrap();
        let port = server.local_port();
        let mut set = PollSet::kept();
        server.sync(&mut set, now);
        assert_eq!(set.len(), 1, "the listener");
        // Waits on `set` as it is until `n` connections are open, then syncs.
        let accept = |server: &mut TcpTransport, set: &mut PollSet, n: usize| {
            for _ in 0..100 {
                set.wait(Duration::from_millis(20)).unwrap();
                server.service(set, now);
                if server.connection_counts().0 == n {
                    server.sync(set, now);
                    return;
                }
            }
            panic!("no connection accepted");
        };
        let _first = TcpStream::connect(("127.0.0.1", port)).unwrap();
        accept(&mut server, &mut set, 1);
        assert_eq!(set.len(), 2);
        // Closed and replaced before the next sync: the same slot and (the
        // client's socket made first) most likely the same descriptor
        // number; the new one is in the set, in the old one's place.
        let mut second = TcpStream::connect(("127.0.0.1", port)).unwrap();
        server.close(0, now, None);
        accept(&mut server, &mut set, 1);
        assert!(server.conns[0].is_some(), "the slot was reused");
        assert_eq!(set.len(), 2, "and its place in the set");
        let mut frame = vec![0, 32, 4, 0, 0, 0];
        frame.resize(2 + 32, 0);
        second.write_all(&frame).unwrap();
        let mut rx = Batch::new(8, 4096);
        let mut got = 0;
        for _ in 0..50 {
            set.wait(Duration::from_millis(20)).unwrap();
            server.service(&set, now);
            got += server.receive(&mut rx, now);
            server.sync(&mut set, now);
            if got > 0 {
                break;
            }
        }
        assert_eq!(got, 1, "the new connection is waited on");
        // Many come and go, a few at a time: the set grows to the most
        // open at once, not with every one.
        for _ in 0..10 {
            let three: Vec<TcpStream> = (0..3)
                .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
                .collect();
            accept(&mut server, &mut set, 4);
            for id in 1..server.conns.len() {
                server.close(id, now, None);
            }
            server.sync(&mut set, now);
            drop(three);
        }
        assert_eq!(set.len(), 5, "the listener and four places");
    }

    #[test]
    fn frames_cross_a_loopback_connection_both_ways() {
        let now = Instant::now();
        let mut server = TcpTransport::new(Some(0), 2048, 1).unwrap();
        let port = server.local_port();
        let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut client = TcpTransport::new(None, 2048, 2).unwrap();
        client.set_dials(&[target], now);
        let mut rx = Batch::new(8, 4096);
        for _ in 0..50 {
            pump(&mut client, now);
            pump(&mut server, now);
            if client.connected_to(target) && server.connection_counts().0 == 1 {
                break;
            }
        }
        assert_eq!(client.take_connected(), vec![target]);
        let mut tx = Batch::new(8, 4096);
        let msg = |b: u8, len: usize| {
            let mut m = vec![b; len];
            m[..4].copy_from_slice(&[4, 0, 0, 0]);
            m
        };
        for i in 0..3 {
            let m = msg(i as u8 + 10, 100 + i * 500);
            tx.slot_mut(i)[..m.len()].copy_from_slice(&m);
            tx.set(i, m.len(), &to_v6(target));
        }
        client.send(&tx, 3, now);
        let mut got = Vec::new();
        for _ in 0..50 {
            pump(&mut server, now);
            let n = server.receive(&mut rx, now);
            for i in 0..n {
                let (d, from) = rx.datagram_mut(i);
                got.push((d.to_vec(), from_v6(SocketAddr::V6(from))));
            }
            if got.len() == 3 {
                break;
            }
        }
        assert_eq!(got.len(), 3);
        assert_eq!(got[2].0, msg(12, 1100));
        let from = got[0].1;
        assert_eq!(server.connection_counts(), (1, 1), "not authenticated yet");
        server.authenticated(from);
        assert_eq!(server.connection_counts(), (1, 0));
        // The server answers to the address the message came from.
        let m = msg(99, 40);
        tx.slot_mut(0)[..40].copy_from_slice(&m);
        tx.set(0, 40, &to_v6(from));
        server.send(&tx, 1, now);
        let mut back = 0;
        for _ in 0..50 {
            pump(&mut client, now);
            back += client.receive(&mut rx, now);
            if back == 1 {
                break;
            }
        }
        assert_eq!(back, 1);
        assert_eq!(rx.datagram_mut(0).0, &m[..]);
    }

    #[test]
    fn garbage_closes_only_its_connection_and_the_client_backs_off() {
        let now = Instant::now();
        let mut server = TcpTransport::new(Some(0), 2048, 1).unwrap();
        let port = server.local_port();
        let mut bad = TcpStream::connect(("127.0.0.1", port)).unwrap();
        bad.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut rx = Batch::new(8, 4096);
        for _ in 0..20 {
            pump(&mut server, now);
            server.receive(&mut rx, now);
        }
        assert_eq!(server.stats.bad_frames, 1);
        assert_eq!(server.connection_counts().0, 0);
        // A dial to a closed port waits 1 s, then 2 s...
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = closed.local_addr().unwrap();
        drop(closed);
        let mut client = TcpTransport::new(None, 2048, 5).unwrap();
        client.set_dials(&[target], now);
        for _ in 0..20 {
            pump(&mut client, now);
        }
        let (state, failures, err) = client.dial_state(target).unwrap();
        assert!(
            matches!(state, DialState::Waiting { until } if until >= now + BACKOFF_MIN),
            "{state:?}"
        );
        assert_eq!(failures, 1);
        assert!(err.is_some_and(|e| e.contains("refused")), "{err:?}");
    }

    #[test]
    fn a_lost_connections_failing_attempts_are_said() {
        let now = Instant::now();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = listener.local_addr().unwrap();
        let mut client = TcpTransport::new(None, 2048, 5).unwrap();
        client.set_dials(&[target], now);
        for _ in 0..20 {
            pump(&mut client, now);
        }
        let (accepted, _) = listener.accept().unwrap();
        drop((accepted, listener));
        let mut rx = Batch::new(8, 4096);
        for _ in 0..20 {
            pump(&mut client, now);
            client.receive(&mut rx, now);
        }
        // Attempts far enough apart that each is due (30 s at most).
        for k in 1..=12u64 {
            let t = now + Duration::from_secs(40 * k);
            client.handle_timeout(t);
            for _ in 0..3 {
                pump(&mut client, t);
                client.receive(&mut rx, t);
            }
        }
        let said: Vec<&str> = client.events.iter().map(String::as_str).collect();
        let find = |what: &str| said.iter().position(|l| l.starts_with(what));
        let (up, lost, failing, still) = (
            find("connected to"),
            find("connection to"),
            find("cannot connect to"),
            find("still cannot connect to"),
        );
        // (After the loss nothing more was said, however long it lasted.)
        assert!(
            up < lost && lost < failing && failing < still && still.is_some(),
            "{said:?}"
        );
        assert_eq!(said.len(), 4, "{said:?}");
    }

    #[test]
    fn half_a_frame_is_not_input_to_wake_for() {
        let now = Instant::now();
        let mut server = TcpTransport::new(Some(0), 2048, 1).unwrap();
        let port = server.local_port();
        let mut slow = TcpStream::connect(("127.0.0.1", port)).unwrap();
        // A frame that announces 1000 bytes, then 34 of them, then nothing.
        let mut head = vec![0x03, 0xe8, 4, 0, 0, 0];
        head.extend_from_slice(&[0; 30]);
        slow.write_all(&head).unwrap();
        let mut rx = Batch::new(8, 4096);
        for _ in 0..20 {
            pump(&mut server, now);
            server.receive(&mut rx, now);
        }
        assert!(!server.has_input(), "the packet thread would spin on it");
        assert_eq!(server.connection_counts(), (1, 1));
    }

    #[test]
    fn pending_connections_are_capped_and_expire() {
        let now = Instant::now();
        let mut server = TcpTransport::new(Some(0), 2048, 1).unwrap();
        let port = server.local_port();
        // Each from an address of its own (127.0.0.0/8 is all loopback).
        let held: Vec<TcpStream> = (0..MAX_PENDING + 10)
            .map(|i| connect_from([127, 0, 1, i as u8 + 1], port))
            .collect();
        for _ in 0..30 {
            pump(&mut server, now);
        }
        assert_eq!(server.stats.accepted as usize, MAX_PENDING + 10);
        assert_eq!(server.connection_counts(), (MAX_PENDING, MAX_PENDING));
        server.handle_timeout(now + HANDSHAKE_DEADLINE);
        assert_eq!(server.connection_counts(), (0, 0));
        drop(held);
    }

    #[test]
    fn a_peers_idle_connection_stays() {
        let now = Instant::now();
        let mut server = TcpTransport::new(Some(0), 2048, 1).unwrap();
        let port = server.local_port();
        let client = connect_from([127, 0, 2, 1], port);
        for _ in 0..5 {
            pump(&mut server, now);
        }
        let from = from_v6(client.local_addr().unwrap());
        assert!(server.authenticated(from));
        // Idle for an hour: nothing is due for it, and it stays (a stock
        // WireGuard behind udp2tcp, without keepalives, lost its tunnel
        // for good when an idle close took its connection).
        assert_eq!(server.next_deadline(now), None);
        server.handle_timeout(now + Duration::from_secs(3600));
        assert_eq!(server.connection_counts().0, 1);
    }
}
