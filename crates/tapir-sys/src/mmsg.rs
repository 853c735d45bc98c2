//! Batched UDP I/O: `recvmmsg(2)` and `sendmmsg(2)` over buffers allocated
//! once and reused, so the datapath allocates nothing per packet.
//!
//! ```text
//!   Batch { N slots of SLOT bytes, lengths, IPv6 addresses, iovecs, mmsghdrs }
//!   recv(fd)  ─▶ k datagrams in slots 0..k       (one system call)
//!   set(i, len, to) ... send(fd, k)             (one system call for k datagrams)
//! ```
//! The socket is expected to be an IPv6 one (dual-stack: IPv4 peers appear as
//! v4-mapped addresses), so every address here is a `SocketAddrV6`.
//!
//! UDP segmentation offload: [`Batch::send_gso`] joins runs of datagrams to
//! one address with one size (the last may be shorter) into one message with
//! a `UDP_SEGMENT` control message, which the kernel cuts up again (after
//! the stack, or in the NIC): one trip through the stack for up to 64
//! datagrams. With `UDP_GRO` on the socket ([`enable_gro`]), the kernel hands
//! over runs of datagrams as one buffer, and [`Batch::segment_size`] says
//! where to cut it.

use std::io;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::raw;

/// `UDP_SEGMENT` (linux/udp.h): a send's segment size.
const UDP_SEGMENT: libc::c_int = 103;
/// `UDP_GRO` (linux/udp.h): receive coalesced datagrams, with their segment size.
const UDP_GRO: libc::c_int = 104;
/// Control buffer per message, in u64 words (aligned for cmsghdr): room for
/// a `UDP_GRO` or `UDP_SEGMENT` message (an int) and an `IPV6_PKTINFO` one
/// (an `in6_pktinfo`), 24 + 40 bytes.
const CTRL_WORDS: usize = 8;
/// The most datagrams one GSO send may carry (the kernel's UDP_MAX_SEGMENTS).
const GSO_MAX_SEGMENTS: usize = 64;
/// The most bytes one GSO send may carry (a UDP datagram's payload limit).
const GSO_MAX_BYTES: usize = 65507;

/// The local end of a datagram: the address it came to (or is to leave
/// from) and its interface, as `IPV6_PKTINFO` gives them (an IPv4 address
/// v4-mapped, on a dual-stack socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Local {
    /// The address.
    pub addr: Ipv6Addr,
    /// Its interface's index.
    pub ifindex: u32,
}

/// Asks the kernel for each datagram's local address and interface, or
/// not any more (`IPV6_RECVPKTINFO`: for IPv4 datagrams too, v4-mapped),
/// so that an answer can leave from the address it was sent to; `false`
/// where it cannot.
pub fn set_pktinfo(fd: BorrowedFd<'_>, on: bool) -> bool {
    set_int(
        fd,
        libc::IPPROTO_IPV6,
        libc::IPV6_RECVPKTINFO,
        i32::from(on),
    )
}

/// Whether datagrams come with their local address ([`set_pktinfo`]).
pub fn pktinfo(fd: BorrowedFd<'_>) -> bool {
    get_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO).is_ok_and(|v| v != 0)
}

/// Asks the kernel to coalesce received datagrams (`UDP_GRO`); `false` where it cannot.
pub fn enable_gro(fd: BorrowedFd<'_>) -> bool {
    set_gro(fd, true)
}

/// Turns `UDP_GRO` on or off; `false` where the kernel refused. Off, the
/// datagrams that arrive from then on are handed over one by one, but
/// those already waiting that it coalesced stay whole and no longer come
/// with their segment size (the kernel gives it only while the option is
/// on): see [`Batch::recv_plain`].
pub fn set_gro(fd: BorrowedFd<'_>, on: bool) -> bool {
    set_int(fd, libc::SOL_UDP, UDP_GRO, i32::from(on))
}

/// Whether the kernel knows `UDP_SEGMENT` for this socket (it refuses an
/// unknown option; a device without checksum offload shows only at send
/// time, with EIO, which [`Batch::send_gso`] handles).
pub fn gso_supported(fd: BorrowedFd<'_>) -> bool {
    // A zero segment size means "no segmentation" and changes nothing.
    set_int(fd, libc::SOL_UDP, UDP_SEGMENT, 0)
}

/// Sets an int socket option; whether the kernel took it.
fn set_int(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> bool {
    // SAFETY: setsockopt reads sizeof(int) bytes from a live local.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// Reads an int socket option.
fn get_int(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut b = [0u8; std::mem::size_of::<libc::c_int>()];
    raw::getsockopt(fd, level, name, &mut b)?;
    Ok(libc::c_int::from_ne_bytes(b))
}

/// Asks for socket buffers of `bytes` each way: past the system's limits
/// (`net.core.rmem_max`, `wmem_max`; 208 KiB on most distributions) with
/// `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` where the process may (it has
/// `CAP_NET_ADMIN`), else as far as those limits let `SO_RCVBUF`/`SO_SNDBUF`
/// go. Returns the receive and send buffers the kernel then reports (twice
/// what it was asked for: it counts its own overhead in).
///
/// The default receive buffer holds three or four coalesced 64 KiB
/// datagrams: a busy tunnel's receiver that falls that far behind for a
/// moment loses whole runs of segments at once.
pub fn set_buffer_sizes(fd: BorrowedFd<'_>, bytes: usize) -> (usize, usize) {
    let n = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if !set_int(fd, libc::SOL_SOCKET, force, n) {
            let _ = set_int(fd, libc::SOL_SOCKET, plain, n);
        }
    }
    let get =
        |name| get_int(fd, libc::SOL_SOCKET, name).map_or(0, |v| usize::try_from(v).unwrap_or(0));
    (get(libc::SO_RCVBUF), get(libc::SO_SNDBUF))
}

/// Packets the kernel dropped at this socket since it was made (its
/// receive buffer full, mostly): `SO_MEMINFO`'s drop count.
pub fn socket_drops(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // (The kernel fills what fits of its array of u32s: 9 entries or more.)
    let mut b = [0u8; 64];
    let len = raw::getsockopt(fd, libc::SOL_SOCKET, libc::SO_MEMINFO, &mut b)?;
    let at = libc::SK_MEMINFO_DROPS as usize * 4;
    match b.get(at..at + 4).filter(|_| len >= at + 4) {
        Some(d) => Ok(u64::from(u32::from_ne_bytes(
            d.try_into().expect("4 bytes"),
        ))),
        None => Err(io::Error::from(io::ErrorKind::Unsupported)),
    }
}

/// What a batched send did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    /// Datagrams the kernel took.
    pub sent: usize,
    /// Datagrams dropped: refused by the kernel (too big, unreachable, filtered).
    pub refused: usize,
    /// Datagrams dropped: the socket buffer stayed full.
    pub blocked: usize,
    /// Messages (system-call entries) used: fewer than `sent` with GSO.
    pub messages: usize,
    /// A datagram could not leave from the local address it was given (it
    /// is gone): it went from the kernel's choice.
    pub stale_local: bool,
}

/// What [`Batch::send_connected`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectedSend {
    /// Sent, or dropped as any send is (refused, the buffer stayed full).
    Done(Sent),
    /// The socket is not connected (any more): nothing went.
    NotConnected,
    /// The socket's local address is gone: nothing went, and the socket
    /// is to be made again.
    Stale,
}

/// A datagram [`Batch::recv_one`] received into slot 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct One {
    /// Its length (of all its segments, if coalesced).
    pub len: usize,
    /// Its sender.
    pub from: SocketAddrV6,
    /// The size of the datagrams it joins, if the kernel coalesced it.
    pub segment: Option<usize>,
    /// Where it came to (with [`set_pktinfo`]).
    pub local: Option<Local>,
}

/// Reusable buffers for up to `N` datagrams of `slot` bytes.
pub struct Batch {
    data: Vec<u8>,
    slot: usize,
    lens: Vec<usize>,
    addrs: Vec<libc::sockaddr_in6>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    ctrl: Vec<[u64; CTRL_WORDS]>,
    /// Received: the segment size of a coalesced (GRO) datagram, 0 if none.
    seg: Vec<usize>,
    /// The local end of each datagram: where it came to (received), where
    /// it is to leave from (sent; none: the kernel's choice).
    locals: Vec<Option<Local>>,
    /// Send: (first slot, count) of each message.
    groups: Vec<(usize, usize)>,
    /// Receive: the headers are set up for [`Batch::recv`] but for the
    /// fields the kernel wrote into the first `recv_dirty` (false after a
    /// send from this batch).
    recv_ready: bool,
    recv_dirty: usize,
    /// The slots the last send dropped (refused or blocked), in order.
    dropped: Vec<usize>,
}

// SAFETY: the raw pointers in `iovs` and `hdrs` point only into the Batch's
// own heap buffers (`data`, `addrs`, `iovs`, `ctrl`), which do not move when
// the Batch does, and are used only through `&mut self`: a Batch may move
// to another thread (or sit behind a Mutex) like the Vecs it is made of.
unsafe impl Send for Batch {}

fn empty_sockaddr() -> libc::sockaddr_in6 {
    // SAFETY: sockaddr_in6 is a plain C struct of integers; all-zero is valid.
    unsafe { std::mem::zeroed() }
}

fn zeroed_iovec() -> libc::iovec {
    // SAFETY: iovec is a plain C struct of a pointer and a length; all-zero is valid.
    unsafe { std::mem::zeroed() }
}

fn zeroed_mmsghdr() -> libc::mmsghdr {
    // SAFETY: mmsghdr is a plain C struct of integers and pointers; all-zero
    // (null pointers, zero lengths) is valid.
    unsafe { std::mem::zeroed() }
}

fn to_sockaddr(a: &SocketAddrV6) -> libc::sockaddr_in6 {
    let mut s = empty_sockaddr();
    s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    s.sin6_port = a.port().to_be();
    s.sin6_flowinfo = a.flowinfo();
    s.sin6_addr.s6_addr = a.ip().octets();
    s.sin6_scope_id = a.scope_id();
    s
}

/// The sender the kernel wrote into `s`, `len` bytes: an IPv6 socket's
/// (`sockaddr_in6`), or an IPv4 socket's (`sockaddr_in`, as v4-mapped);
/// unspecified if neither.
fn sender(s: &libc::sockaddr_in6, len: usize) -> libc::sockaddr_in6 {
    if len == std::mem::size_of::<libc::sockaddr_in6>() {
        return *s;
    }
    if len != std::mem::size_of::<libc::sockaddr_in>() || s.sin6_family != libc::AF_INET as u16 {
        return empty_sockaddr();
    }
    // sockaddr_in: family, port, then the address where sin6_flowinfo is.
    let v4 = std::net::Ipv4Addr::from(u32::from_be(s.sin6_flowinfo));
    to_sockaddr(&SocketAddrV6::new(
        v4.to_ipv6_mapped(),
        u16::from_be(s.sin6_port),
        0,
        0,
    ))
}

fn from_sockaddr(s: &libc::sockaddr_in6) -> SocketAddrV6 {
    SocketAddrV6::new(
        Ipv6Addr::from(s.sin6_addr.s6_addr),
        u16::from_be(s.sin6_port),
        s.sin6_flowinfo,
        s.sin6_scope_id,
    )
}

impl Batch {
    /// Buffers for `count` datagrams of up to `slot` bytes each.
    pub fn new(count: usize, slot: usize) -> Self {
        Self {
            data: vec![0; count * slot],
            slot,
            lens: vec![0; count],
            addrs: vec![empty_sockaddr(); count],
            iovs: vec![zeroed_iovec(); count],
            hdrs: vec![zeroed_mmsghdr(); count],
            ctrl: vec![[0; CTRL_WORDS]; count],
            seg: vec![0; count],
            locals: vec![None; count],
            groups: Vec::with_capacity(count),
            recv_ready: false,
            recv_dirty: 0,
            dropped: Vec::with_capacity(count),
        }
    }

    /// The slots whose datagrams the last [`Batch::send_one`] or
    /// [`Batch::send_gso`] dropped (the kernel refused them, or the socket
    /// buffer stayed full): what was counted as going out and did not.
    pub fn dropped(&self) -> &[usize] {
        &self.dropped
    }

    /// For datagram `i` after [`Batch::recv`] on a socket with `UDP_GRO`:
    /// the size of the datagrams it joins (all but the last have it), or
    /// `None` if it is a single datagram.
    pub fn segment_size(&self, i: usize) -> Option<usize> {
        let s = self.seg[i];
        (s > 0 && s < self.lens[i]).then_some(s)
    }

    /// Records datagram `i` as coalesced from datagrams of `size` bytes,
    /// where the kernel did not say so (see [`set_gro`]).
    pub fn set_segment_size(&mut self, i: usize, size: usize) {
        self.seg[i] = size;
    }

    /// Datagram `i`'s local end: where it came to (after a receive), or
    /// where it is to leave from (as set for a send).
    pub fn local(&self, i: usize) -> Option<Local> {
        self.locals[i]
    }

    /// Sends datagram `i` (as set) from `local`, not from the address the
    /// kernel would choose.
    pub fn set_local(&mut self, i: usize, local: Option<Local>) {
        self.locals[i] = local;
    }

    /// How many datagrams it holds.
    pub fn capacity(&self) -> usize {
        self.lens.len()
    }

    /// Slot `i`, to fill before [`Batch::set`].
    pub fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.data[i * self.slot..(i + 1) * self.slot]
    }

    /// Copies the first `len` bytes of slot `from` into slot `to` (closing
    /// a gap left by a datagram that was not sent after all).
    pub fn copy_slot(&mut self, from: usize, to: usize, len: usize) {
        let len = len.min(self.slot);
        self.data
            .copy_within(from * self.slot..from * self.slot + len, to * self.slot);
    }

    /// Datagram `i` after [`Batch::recv`]: its bytes (in place, mutable for
    /// in-place decryption) and its sender.
    pub fn datagram_mut(&mut self, i: usize) -> (&mut [u8], SocketAddrV6) {
        let addr = from_sockaddr(&self.addrs[i]);
        let len = self.lens[i];
        (&mut self.data[i * self.slot..i * self.slot + len], addr)
    }

    /// Slot `i` whole, with datagram `i`'s length: room to seal a received
    /// frame again in place for another peer.
    pub fn slot_with_len(&mut self, i: usize) -> (&mut [u8], usize) {
        let len = self.lens[i];
        (&mut self.data[i * self.slot..(i + 1) * self.slot], len)
    }

    /// Records slot `i` as a datagram of `len` bytes received from `from`
    /// (for transports that fill slots themselves, as TCP does).
    pub fn set_received(&mut self, i: usize, len: usize, from: &SocketAddrV6) {
        self.set(i, len, from);
    }

    /// Datagram `i` as set for sending: its bytes and its destination.
    pub fn outgoing(&self, i: usize) -> (&[u8], SocketAddrV6) {
        (
            &self.data[i * self.slot..i * self.slot + self.lens[i]],
            from_sockaddr(&self.addrs[i]),
        )
    }

    /// Marks slot `i` as a datagram of `len` bytes for `to` (from where the
    /// kernel chooses, until [`Batch::set_local`]).
    pub fn set(&mut self, i: usize, len: usize, to: &SocketAddrV6) {
        self.lens[i] = len.min(self.slot);
        self.addrs[i] = to_sockaddr(to);
        self.locals[i] = None;
    }

    /// Points the headers at the first `n` slots.
    fn prepare(&mut self, n: usize, lens_from_slots: bool) {
        self.recv_ready = false;
        for i in 0..n {
            self.iovs[i] = self.iovec(i, lens_from_slots);
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in6).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            if !lens_from_slots {
                write_cmsgs(&mut self.ctrl[i], h, None, self.locals[i]);
            }
            self.hdrs[i].msg_len = 0;
        }
    }

    /// An iovec for slot `i` (whole, or the length set); `i` < capacity.
    #[inline]
    fn iovec(&mut self, i: usize, lens_from_slots: bool) -> libc::iovec {
        debug_assert!(i < self.capacity());
        libc::iovec {
            // SAFETY: i < capacity, so the offset stays inside `data`.
            iov_base: unsafe { self.data.as_mut_ptr().add(i * self.slot) }.cast(),
            iov_len: if lens_from_slots {
                self.slot
            } else {
                self.lens[i]
            },
        }
    }

    /// Receives up to `capacity` datagrams without blocking; returns how many
    /// (0 when none is waiting).
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        self.recv_up_to(fd, usize::MAX)
    }

    /// [`Batch::recv`], but `max` datagrams at most: for one, the kernel
    /// does not look for a second (which, for a lone datagram, costs it a
    /// look at an empty queue).
    pub fn recv_up_to(&mut self, fd: BorrowedFd<'_>, max: usize) -> io::Result<usize> {
        let n = self.capacity();
        let ctrl_len = std::mem::size_of::<[u64; CTRL_WORDS]>();
        if self.recv_ready {
            // A lone datagram (a ping) touches one header, not all 64: the
            // kernel writes only the lengths and flags of those it filled.
            for m in &mut self.hdrs[..self.recv_dirty] {
                m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as _;
                m.msg_hdr.msg_controllen = ctrl_len as _;
                m.msg_hdr.msg_flags = 0;
                m.msg_len = 0;
            }
        } else {
            self.prepare(n, true);
            for i in 0..n {
                let h = &mut self.hdrs[i].msg_hdr;
                h.msg_control = self.ctrl[i].as_mut_ptr().cast();
                h.msg_controllen = ctrl_len as _;
            }
            self.recv_ready = true;
        }
        self.recv_dirty = 0;
        // SAFETY: the headers point at `n` iovecs, address buffers and slots
        // owned by `self`, valid and unaliased for the call; the kernel writes
        // at most the lengths given.
        let rc = unsafe {
            raw::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                n.min(max.max(1)),
                libc::MSG_DONTWAIT,
            )
        };
        let got = match rc {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(e),
        };
        self.recv_dirty = got;
        for i in 0..got {
            let (seg, local) = read_cmsgs(&self.hdrs[i].msg_hdr);
            self.seg[i] = seg.unwrap_or(0);
            self.locals[i] = local;
            self.lens[i] = self.hdrs[i].msg_len as usize;
            self.addrs[i] = sender(&self.addrs[i], self.hdrs[i].msg_hdr.msg_namelen as usize);
        }
        Ok(got)
    }

    /// Receives one datagram into slot 0 without blocking, through none of
    /// the batch's headers (a lone datagram, a ping, touches its slot and
    /// a header on the stack only); `None` when none is waiting. Its
    /// length, sender, and segment size if the kernel coalesced it
    /// (`UDP_GRO`): [`Batch::set_received_one`] records such a one in slot
    /// 0 for the batch's own reading.
    pub fn recv_one(&mut self, fd: BorrowedFd<'_>) -> io::Result<Option<One>> {
        let mut from = empty_sockaddr();
        let mut ctrl = [0u64; CTRL_WORDS];
        let mut iov = libc::iovec {
            iov_base: self.data.as_mut_ptr().cast(),
            iov_len: self.slot,
        };
        let mut h = zeroed_mmsghdr().msg_hdr;
        h.msg_name = (&mut from as *mut libc::sockaddr_in6).cast();
        h.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        h.msg_iov = &mut iov;
        h.msg_iovlen = 1;
        h.msg_control = ctrl.as_mut_ptr().cast();
        h.msg_controllen = std::mem::size_of_val(&ctrl) as _;
        // SAFETY: the header points at live locals (address, control
        // buffer, iovec) and at slot 0, `slot` bytes inside `data`.
        let len = match unsafe { raw::recvmsg(fd, &mut h) } {
            Ok(len) => len,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        };
        let from = sender(&from, h.msg_namelen as usize);
        let (seg, local) = read_cmsgs(&h);
        Ok(Some(One {
            len,
            from: from_sockaddr(&from),
            segment: seg.filter(|&s| s > 0 && s < len),
            local,
        }))
    }

    /// [`Batch::recv_one`] by `recvfrom(2)`: no control messages, so
    /// neither a segment size nor the local address. Only for a socket
    /// that asks for neither: without `IPV6_RECVPKTINFO`, and without
    /// `UDP_GRO` since before the datagrams now waiting arrived (one the
    /// kernel coalesced would come whole, its segment size untold).
    pub fn recv_plain(&mut self, fd: BorrowedFd<'_>) -> io::Result<Option<One>> {
        let mut from = empty_sockaddr();
        let (len, from_len) = match raw::recvfrom(fd, &mut self.data[..self.slot], &mut from) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        };
        let from = sender(&from, from_len);
        Ok(Some(One {
            len,
            from: from_sockaddr(&from),
            segment: None,
            local: None,
        }))
    }

    /// [`Batch::recv_plain`] on a socket connected to `peer`, by `recv(2)`:
    /// the sender can only be `peer`, and is not copied out.
    pub fn recv_connected(
        &mut self,
        fd: BorrowedFd<'_>,
        peer: SocketAddrV6,
    ) -> io::Result<Option<One>> {
        let len = match raw::recv(fd, &mut self.data[..self.slot]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(Some(One {
            len,
            from: peer,
            segment: None,
            local: None,
        }))
    }

    /// Records slot 0 as what [`Batch::recv_one`] received, for reading it
    /// as a batch of one ([`Batch::datagram_mut`], [`Batch::segment_size`]).
    pub fn set_received_one(&mut self, one: &One) {
        self.set(0, one.len, &one.from);
        self.seg[0] = one.segment.unwrap_or(0);
        self.locals[0] = one.local;
    }

    /// Sends slot `i`'s first `len` bytes to `to` as one datagram, through
    /// none of the batch's headers (a lone datagram touches its slot and
    /// the stack only). A full socket buffer is waited out as in
    /// [`Batch::send_gso`].
    pub fn send_one(
        &mut self,
        fd: BorrowedFd<'_>,
        i: usize,
        len: usize,
        to: &SocketAddrV6,
        from: Option<Local>,
        patience: std::time::Duration,
    ) -> Sent {
        let to = to_sockaddr(to);
        let datagram = &self.data[i * self.slot..i * self.slot + len.min(self.slot)];
        let mut patience = Patience::new(patience);
        let mut out = Sent {
            messages: 1,
            ..Sent::default()
        };
        let mut from = from;
        let mut suspect = false;
        self.dropped.clear();
        loop {
            let rc = match from {
                None => raw::sendto(fd, datagram, &to),
                Some(l) => send_from(fd, datagram, &to, l),
            };
            match rc {
                // Refused from the address it was given and taken from the
                // kernel's choice: that address is gone (or no longer
                // routes there), and said. (Refused both ways, it was not
                // the address: a firewall, no route to the peer.)
                Ok(_) => {
                    out.sent = 1;
                    out.stale_local = suspect;
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) if patience.left() => {
                        wait_writable(fd, patience.deadline());
                        continue;
                    }
                    Some(libc::EAGAIN) | Some(libc::EBADF) => out.blocked = 1,
                    _ if from.is_some() => {
                        from = None;
                        suspect = true;
                        continue;
                    }
                    _ => out.refused = 1,
                },
            }
            if out.sent == 0 {
                self.dropped.push(i);
            }
            return out;
        }
    }

    /// [`Batch::send_one`] on a connected socket, to where it is connected:
    /// no address, and the kernel takes the route it keeps for the socket
    /// rather than looking one up. An error that an earlier datagram's ICMP
    /// answer left on the socket (refused, unreachable) comes back from the
    /// next send, which did not go: that one is tried again, once.
    pub fn send_connected(
        &mut self,
        fd: BorrowedFd<'_>,
        i: usize,
        len: usize,
        patience: std::time::Duration,
    ) -> ConnectedSend {
        let datagram = &self.data[i * self.slot..i * self.slot + len.min(self.slot)];
        let mut patience = Patience::new(patience);
        let mut out = Sent {
            messages: 1,
            ..Sent::default()
        };
        let mut again = true;
        self.dropped.clear();
        loop {
            match raw::send(fd, datagram) {
                Ok(_) => out.sent = 1,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) if patience.left() => {
                        wait_writable(fd, patience.deadline());
                        continue;
                    }
                    Some(libc::EAGAIN) => out.blocked = 1,
                    Some(libc::EDESTADDRREQ | libc::ENOTCONN | libc::EBADF) => {
                        return ConnectedSend::NotConnected;
                    }
                    // Its local address is gone (IPv4 checks it at each
                    // route look-up).
                    Some(libc::EINVAL | libc::EADDRNOTAVAIL) => return ConnectedSend::Stale,
                    _ if std::mem::take(&mut again) => continue,
                    _ => out.refused = 1,
                },
            }
            if out.sent == 0 {
                self.dropped.push(i);
            }
            return ConnectedSend::Done(out);
        }
    }

    /// Sends the datagrams set in slots `0..n`, joining runs to one address
    /// with one size into `UDP_SEGMENT` messages while `*gso` holds; a kernel
    /// that refuses a segmented send (EIO: a device without checksum
    /// offload) turns `*gso` off and the rest goes one datagram per message.
    /// A full socket buffer is waited out (up to `patience`), not dropped
    /// silently: what is dropped is counted in the result.
    pub fn send_gso(
        &mut self,
        fd: BorrowedFd<'_>,
        n: usize,
        gso: &mut bool,
        patience: std::time::Duration,
    ) -> Sent {
        let n = n.min(self.capacity());
        self.dropped.clear();
        if n == 1 {
            // A lone datagram (a ping, an ACK): no runs to look for.
            return self.send_plain(fd, 0, 1, &mut Patience::new(patience));
        }
        // The iovecs only: `build_group_headers` sets every field of the
        // headers it sends.
        self.recv_ready = false;
        for i in 0..n {
            self.iovs[i] = self.iovec(i, false);
        }
        // Runs: same address, same length but for a shorter last one.
        self.groups.clear();
        let mut i = 0;
        while i < n {
            let (size, to) = (self.lens[i], self.addrs[i]);
            let mut count = 1;
            let mut total = size;
            if *gso {
                while i + count < n
                    && count < GSO_MAX_SEGMENTS
                    && same_addr(&self.addrs[i + count], &to)
                    && self.locals[i + count] == self.locals[i]
                    && self.lens[i + count] <= size
                    && total + self.lens[i + count] <= GSO_MAX_BYTES
                {
                    total += self.lens[i + count];
                    count += 1;
                    if self.lens[i + count - 1] < size {
                        break;
                    }
                }
            }
            self.groups.push((i, count));
            i += count;
        }
        self.build_group_headers();
        let messages = self.groups.len();
        let mut out = Sent {
            messages,
            ..Sent::default()
        };
        let mut patience = Patience::new(patience);
        let mut m = 0;
        // A run refused from its local address, sent again without it: if
        // that goes, the address is gone (see `send_one`).
        let mut suspect = false;
        while m < messages {
            // SAFETY: the headers point at iovecs, addresses, control
            // buffers and slots owned by `self`; the kernel only reads them.
            let rc = unsafe { raw::sendmmsg(fd, self.hdrs[m..].as_mut_ptr(), messages - m, 0) };
            let e = match rc {
                Ok(k) => {
                    for g in m..m + k {
                        out.sent += self.groups[g].1;
                    }
                    m += k;
                    out.stale_local |= suspect && k > 0;
                    suspect = false;
                    continue;
                }
                Err(e) => e,
            };
            let (start, count) = self.groups[m];
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN) if patience.left() => {
                    wait_writable(fd, patience.deadline());
                }
                Some(libc::EAGAIN) => {
                    // Still full after waiting: the rest is dropped, and said so.
                    for g in m..messages {
                        out.blocked += self.groups[g].1;
                    }
                    self.dropped.extend(start..n);
                    return out;
                }
                Some(libc::EIO) if count > 1 => {
                    // Segmentation refused by the device: never again on
                    // this socket; this and the following runs one by one.
                    *gso = false;
                    let rest = self.send_plain(fd, start, n, &mut patience);
                    out.sent += rest.sent;
                    out.refused += rest.refused;
                    out.blocked += rest.blocked;
                    out.messages = m + rest.messages;
                    out.stale_local |= rest.stale_local;
                    return out;
                }
                Some(libc::EBADF) => {
                    out.refused += n - start;
                    self.dropped.extend(start..n);
                    return out;
                }
                // From a local address that is gone: every datagram from it
                // goes from the kernel's choice instead, this one again.
                _ if self.locals[start].is_some() => {
                    let gone = self.locals[start];
                    for l in &mut self.locals[..n] {
                        if *l == gone {
                            *l = None;
                        }
                    }
                    suspect = true;
                    self.build_group_headers();
                }
                // A run the path cannot carry segmented (EINVAL, EMSGSIZE:
                // a segment above the path MTU) goes one datagram per
                // message, which the kernel may fragment.
                Some(libc::EINVAL) | Some(libc::EMSGSIZE) if count > 1 => {
                    suspect = false;
                    let one = self.send_plain(fd, start, start + count, &mut patience);
                    out.sent += one.sent;
                    out.refused += one.refused;
                    out.blocked += one.blocked;
                    out.messages += one.messages;
                    out.stale_local |= one.stale_local;
                    // The plain send reused the headers: set the runs' again.
                    self.prepare(n, false);
                    self.build_group_headers();
                    m += 1;
                }
                // Anything else fails only the message at the head
                // (an unreachable peer, a firewall's EPERM): dropped, as
                // UDP may, and counted.
                _ => {
                    suspect = false;
                    out.refused += count;
                    self.dropped.extend(start..start + count);
                    m += 1;
                }
            }
        }
        out
    }

    /// One message per run (after [`Batch::prepare`] set the iovecs); runs
    /// of one go without a control message.
    fn build_group_headers(&mut self) {
        let iovs = self.iovs.as_mut_ptr();
        for (g, &(start, count)) in self.groups.iter().enumerate() {
            let h = &mut self.hdrs[g].msg_hdr;
            h.msg_name = (&mut self.addrs[start] as *mut libc::sockaddr_in6).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            // SAFETY: start + count <= n <= capacity: inside `iovs`.
            h.msg_iov = unsafe { iovs.add(start) };
            h.msg_iovlen = count as _;
            h.msg_flags = 0;
            let segment = (count > 1).then_some(self.lens[start] as u16);
            write_cmsgs(&mut self.ctrl[g], h, segment, self.locals[start]);
            self.hdrs[g].msg_len = 0;
        }
    }

    /// Sends slots `from..n` one datagram per message.
    fn send_plain(
        &mut self,
        fd: BorrowedFd<'_>,
        from: usize,
        n: usize,
        patience: &mut Patience,
    ) -> Sent {
        self.prepare(n, false);
        let mut out = Sent {
            messages: n - from,
            ..Sent::default()
        };
        let mut i = from;
        // As in `send_gso`.
        let mut suspect = false;
        while i < n {
            // SAFETY: as in `send`.
            let rc = unsafe { raw::sendmmsg(fd, self.hdrs[i..].as_mut_ptr(), n - i, 0) };
            let e = match rc {
                Ok(k) => {
                    out.sent += k;
                    i += k;
                    out.stale_local |= suspect && k > 0;
                    suspect = false;
                    continue;
                }
                Err(e) => e,
            };
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN) if patience.left() => wait_writable(fd, patience.deadline()),
                Some(libc::EAGAIN) | Some(libc::EBADF) => {
                    out.blocked += n - i;
                    self.dropped.extend(i..n);
                    return out;
                }
                // From a local address that is gone: again from the kernel's choice.
                _ if self.locals[i].is_some() => {
                    self.locals[i] = None;
                    suspect = true;
                    let h = &mut self.hdrs[i].msg_hdr;
                    h.msg_control = std::ptr::null_mut();
                    h.msg_controllen = 0;
                }
                _ => {
                    suspect = false;
                    out.refused += 1;
                    self.dropped.push(i);
                    i += 1;
                }
            }
        }
        out
    }

    /// Sends the datagrams set in slots `0..n`; returns how many were handled.
    /// A datagram the kernel refuses (too big, unreachable, filtered) is
    /// dropped, as UDP may; only a bad descriptor is an error.
    pub fn send(&mut self, fd: BorrowedFd<'_>, n: usize) -> io::Result<usize> {
        let n = n.min(self.capacity());
        self.prepare(n, false);
        let mut sent = 0;
        while sent < n {
            // SAFETY: as in `recv`; the kernel only reads the buffers here.
            let rc = unsafe { raw::sendmmsg(fd, self.hdrs[sent..].as_mut_ptr(), n - sent, 0) };
            match rc {
                Ok(k) => sent += k,
                Err(e) => match e.kind() {
                    io::ErrorKind::Interrupted => {}
                    io::ErrorKind::WouldBlock => return Ok(sent),
                    // A bad descriptor is our bug: report it.
                    _ if e.raw_os_error() == Some(libc::EBADF) => return Err(e),
                    // Anything else fails only the datagram at the head
                    // (EMSGSIZE, an unreachable peer, a firewall's EPERM):
                    // drop it, as UDP may, and go on with the rest.
                    _ => sent += 1,
                },
            }
        }
        Ok(sent)
    }
}

fn same_addr(a: &libc::sockaddr_in6, b: &libc::sockaddr_in6) -> bool {
    a.sin6_port == b.sin6_port
        && a.sin6_addr.s6_addr == b.sin6_addr.s6_addr
        && a.sin6_scope_id == b.sin6_scope_id
}

/// Puts a `UDP_SEGMENT` control message with `segment` (if any) and an
/// `IPV6_PKTINFO` one with `from` (if any) into `buf` and points `h` at
/// them; with neither, `h` has no control data.
fn write_cmsgs(
    buf: &mut [u64; CTRL_WORDS],
    h: &mut libc::msghdr,
    segment: Option<u16>,
    from: Option<Local>,
) {
    // SAFETY: CMSG_SPACE is a pure size computation.
    let (seg_space, info_space) = unsafe {
        (
            libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) as usize,
            libc::CMSG_SPACE(std::mem::size_of::<libc::in6_pktinfo>() as u32) as usize,
        )
    };
    let space = segment.map_or(0, |_| seg_space) + from.map_or(0, |_| info_space);
    if space == 0 {
        h.msg_control = std::ptr::null_mut();
        h.msg_controllen = 0;
        return;
    }
    debug_assert!(space <= std::mem::size_of_val(buf));
    *buf = [0; CTRL_WORDS];
    h.msg_control = buf.as_mut_ptr().cast();
    h.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` zeroed, u64-aligned bytes owned
    // by `buf`, room for the messages counted into `space`: CMSG_FIRSTHDR
    // and CMSG_NXTHDR (for the second) return headers inside it, and the
    // data written after each (a u16, an in6_pktinfo) fits its CMSG_SPACE.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        if let Some(size) = segment {
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), size);
            c = libc::CMSG_NXTHDR(h, c);
        }
        if let Some(l) = from {
            (*c).cmsg_level = libc::IPPROTO_IPV6;
            (*c).cmsg_type = libc::IPV6_PKTINFO;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in6_pktinfo>() as u32) as _;
            // The source address only, as the kernel's WireGuard sets it:
            // an interface too would pin the way out, and where the route
            // back leaves by another, the kernel would take the peer for
            // on-link there (and ARP for it). A link-local address means
            // nothing without its interface.
            let link_local = l.addr.segments()[0] & 0xffc0 == 0xfe80;
            let info = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: l.addr.octets(),
                },
                ipi6_ifindex: if link_local { l.ifindex } else { 0 },
            };
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::in6_pktinfo>(), info);
        }
    }
}

/// Sends `datagram` to `to` from local address `from` (`sendmsg` with an
/// `IPV6_PKTINFO` control message).
fn send_from(
    fd: BorrowedFd<'_>,
    datagram: &[u8],
    to: &libc::sockaddr_in6,
    from: Local,
) -> io::Result<usize> {
    let mut ctrl = [0u64; CTRL_WORDS];
    let mut iov = libc::iovec {
        iov_base: datagram.as_ptr().cast_mut().cast(),
        iov_len: datagram.len(),
    };
    let mut to = *to;
    let mut h = zeroed_mmsghdr().msg_hdr;
    h.msg_name = (&mut to as *mut libc::sockaddr_in6).cast();
    h.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    h.msg_iov = &mut iov;
    h.msg_iovlen = 1;
    write_cmsgs(&mut ctrl, &mut h, None, Some(from));
    // SAFETY: the header points at live locals (address, iovec over the
    // datagram, control buffer); the kernel only reads them.
    unsafe { raw::sendmsg(fd, &h) }
}

/// The `UDP_GRO` segment size and the `IPV6_PKTINFO` local end in a
/// received message's control data.
fn read_cmsgs(h: &libc::msghdr) -> (Option<usize>, Option<Local>) {
    let (mut seg, mut local) = (None, None);
    if h.msg_control.is_null() || h.msg_controllen == 0 {
        return (seg, local);
    }
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of
    // well-formed control messages; CMSG_FIRSTHDR/NXTHDR stay within them
    // and return null at the end; the data of a UDP_GRO message is an int,
    // of an IPV6_PKTINFO one an in6_pktinfo (its length checked).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            let (level, kind) = ((*c).cmsg_level, (*c).cmsg_type);
            if level == libc::SOL_UDP && kind == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                seg = usize::try_from(v).ok();
            } else if level == libc::IPPROTO_IPV6
                && kind == libc::IPV6_PKTINFO
                && (*c).cmsg_len as usize
                    >= libc::CMSG_LEN(std::mem::size_of::<libc::in6_pktinfo>() as u32) as usize
            {
                let i = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::in6_pktinfo>());
                local = Some(Local {
                    addr: Ipv6Addr::from(i.ipi6_addr.s6_addr),
                    ifindex: i.ipi6_ifindex,
                });
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    (seg, local)
}

/// How long a send may wait for room in a full socket buffer, counted
/// from the first time it finds it full: a send that never does reads no
/// clock.
struct Patience {
    patience: std::time::Duration,
    deadline: Option<std::time::Instant>,
}

impl Patience {
    fn new(patience: std::time::Duration) -> Self {
        Self {
            patience,
            deadline: None,
        }
    }

    fn deadline(&mut self) -> std::time::Instant {
        *self
            .deadline
            .get_or_insert_with(|| std::time::Instant::now() + self.patience)
    }

    /// Whether there is still time to wait.
    fn left(&mut self) -> bool {
        std::time::Instant::now() < self.deadline()
    }
}

/// Waits until `fd` is writable or `deadline` passes.
fn wait_writable(fd: BorrowedFd<'_>, deadline: std::time::Instant) {
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
    let _ = raw::poll(std::slice::from_mut(&mut p), ms);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;

    /// A datagram's local address comes with it, and an answer can leave
    /// from it: on loopback, one to 127.0.0.2 answered from 127.0.0.2,
    /// where the kernel would choose 127.0.0.1; through the batch's
    /// headers too.
    #[test]
    fn answers_leave_from_the_address_written_to() {
        let server = UdpSocket::bind("[::]:0").unwrap();
        server.set_nonblocking(true).unwrap();
        assert!(!pktinfo(server.as_fd()));
        assert!(set_pktinfo(server.as_fd(), true));
        assert!(pktinfo(server.as_fd()));
        let port = server.local_addr().unwrap().port();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mut b = Batch::new(4, 2048);
        for batch in [false, true] {
            client.send_to(b"hi", ("127.0.0.2", port)).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            let (local, from) = if batch {
                assert_eq!(b.recv(server.as_fd()).unwrap(), 1);
                (b.local(0), b.datagram_mut(0).1)
            } else {
                let one = b.recv_one(server.as_fd()).unwrap().unwrap();
                (one.local, one.from)
            };
            let local = local.expect("IPV6_PKTINFO");
            assert_eq!(local.addr, "::ffff:127.0.0.2".parse::<Ipv6Addr>().unwrap());
            b.slot_mut(0)[..3].copy_from_slice(b"ok!");
            if batch {
                b.set(0, 3, &from);
                b.set(1, 3, &from);
                b.set_local(0, Some(local));
                b.set_local(1, Some(local));
                let mut gso = true;
                let sent = b.send_gso(server.as_fd(), 2, &mut gso, std::time::Duration::ZERO);
                assert_eq!(sent.sent, 2, "{sent:?}");
            } else {
                let sent = b.send_one(
                    server.as_fd(),
                    0,
                    3,
                    &from,
                    Some(local),
                    std::time::Duration::ZERO,
                );
                assert_eq!(sent.sent, 1, "{sent:?}");
            }
            let mut buf = [0u8; 16];
            let (n, src) = client.recv_from(&mut buf).unwrap();
            assert_eq!(
                (&buf[..n], src.ip().to_string()),
                (&b"ok!"[..], "127.0.0.2".into())
            );
            if batch {
                client.recv_from(&mut buf).unwrap();
            }
        }
        // A local address that is not the host's: sent from the kernel's
        // choice instead, and said.
        let gone = Local {
            addr: "::ffff:192.0.2.77".parse().unwrap(),
            ifindex: 0,
        };
        let to = SocketAddrV6::new(
            "::ffff:127.0.0.1".parse().unwrap(),
            client.local_addr().unwrap().port(),
            0,
            0,
        );
        let sent = b.send_one(
            server.as_fd(),
            0,
            3,
            &to,
            Some(gone),
            std::time::Duration::ZERO,
        );
        assert!(sent.sent == 1 && sent.stale_local, "{sent:?}");
        let mut buf = [0u8; 16];
        let (_, src) = client.recv_from(&mut buf).unwrap();
        assert_eq!(src.ip().to_string(), "127.0.0.1");
        // Refused from the kernel's choice too (port 0): not the address's
        // fault, and not said to be (every peer's would be forgotten).
        let nowhere = SocketAddrV6::new("::ffff:127.0.0.1".parse().unwrap(), 0, 0, 0);
        let sent = b.send_one(
            server.as_fd(),
            0,
            3,
            &nowhere,
            Some(gone),
            std::time::Duration::ZERO,
        );
        assert!(sent.refused == 1 && !sent.stale_local, "{sent:?}");
        b.set(0, 3, &nowhere);
        b.set_local(0, Some(gone));
        b.set(1, 3, &nowhere);
        b.set_local(1, Some(gone));
        let mut gso = true;
        let sent = b.send_gso(server.as_fd(), 2, &mut gso, std::time::Duration::ZERO);
        assert!(sent.refused == 2 && !sent.stale_local, "{sent:?}");
    }

    #[test]
    fn a_full_receive_buffer_drops_and_the_drops_are_counted() {
        let rx = UdpSocket::bind("[::1]:0").unwrap();
        let tx = UdpSocket::bind("[::1]:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        // The smallest buffer the kernel allows: a handful of datagrams.
        let (small, _) = set_buffer_sizes(rx.as_fd(), 0);
        assert!(small > 0 && small < 16384, "{small}");
        assert_eq!(socket_drops(rx.as_fd()).unwrap(), 0);
        let to = rx.local_addr().unwrap();
        for _ in 0..100 {
            tx.send_to(&[7u8; 1000], to).unwrap();
        }
        let mut got = 0;
        let mut buf = [0u8; 2000];
        while rx.recv(&mut buf).is_ok() {
            got += 1;
        }
        let dropped = socket_drops(rx.as_fd()).unwrap();
        assert!(got > 0 && dropped > 0, "received {got}, dropped {dropped}");
        assert_eq!(got + dropped, 100);
        // Asked for more, it holds them all (past net.core.rmem_max only
        // with CAP_NET_ADMIN: as root, or up to that limit).
        let (big, send) = set_buffer_sizes(rx.as_fd(), 1 << 20);
        assert!(big > small && send > 0, "{big} {send}");
        for _ in 0..100 {
            tx.send_to(&[7u8; 1000], to).unwrap();
        }
        let mut again = 0;
        while rx.recv(&mut buf).is_ok() {
            again += 1;
        }
        let limit = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(0);
        let net_admin = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let hex = s
                    .lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))?
                    .trim()
                    .to_owned();
                u64::from_str_radix(&hex, 16).ok()
            })
            .is_some_and(|caps| caps >> crate::caps::CAP_NET_ADMIN & 1 == 1);
        if net_admin || limit >= 1 << 20 {
            assert!(big >= 2 << 20, "{big}");
            assert_eq!(again, 100);
            assert_eq!(socket_drops(rx.as_fd()).unwrap(), dropped);
        }
    }

    #[test]
    fn gso_sends_runs_as_one_message_and_gro_hands_them_back_joined() {
        let rx = UdpSocket::bind("[::1]:0").unwrap();
        let tx = UdpSocket::bind("[::1]:0").unwrap();
        assert!(gso_supported(tx.as_fd()), "UDP_SEGMENT (Linux 4.18)");
        let gro = enable_gro(rx.as_fd());
        let to = match rx.local_addr().unwrap() {
            std::net::SocketAddr::V6(a) => a,
            _ => unreachable!(),
        };
        let other = UdpSocket::bind("[::1]:0").unwrap();
        let elsewhere = match other.local_addr().unwrap() {
            std::net::SocketAddr::V6(a) => a,
            _ => unreachable!(),
        };
        // 10 x 1000 bytes and a 300-byte tail to `to`, then one elsewhere.
        let mut out = Batch::new(16, 2048);
        for i in 0..12 {
            let len = match i {
                10 => 300,
                _ => 1000,
            };
            out.slot_mut(i)[..len].fill(i as u8);
            out.set(i, len, if i == 11 { &elsewhere } else { &to });
        }
        let mut on = true;
        let r = out.send_gso(
            tx.as_fd(),
            12,
            &mut on,
            std::time::Duration::from_millis(100),
        );
        assert!(on);
        assert_eq!((r.sent, r.refused, r.blocked), (12, 0, 0));
        assert_eq!(r.messages, 2, "one segmented message and one plain");
        let mut inb = Batch::new(16, 65536);
        let mut got = Vec::new();
        for _ in 0..100 {
            let k = inb.recv(rx.as_fd()).unwrap();
            for i in 0..k {
                let seg = inb.segment_size(i);
                let (d, _) = inb.datagram_mut(i);
                match seg {
                    Some(s) => got.extend(d.chunks(s).map(<[u8]>::to_vec)),
                    None => got.push(d.to_vec()),
                }
            }
            if got.len() >= 11 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(got.len(), 11);
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d.len(), if i == 10 { 300 } else { 1000 });
            assert!(d.iter().all(|b| *b == i as u8));
        }
        let _ = gro;
    }

    /// Receives into `inb` until `want` datagrams came: (length, segment
    /// size, sender) of each.
    fn receive_all(
        inb: &mut Batch,
        rx: &UdpSocket,
        want: usize,
    ) -> Vec<(usize, Option<usize>, SocketAddrV6)> {
        let mut got = Vec::new();
        for _ in 0..200 {
            let k = inb.recv(rx.as_fd()).unwrap();
            for i in 0..k {
                let seg = inb.segment_size(i);
                let (d, from) = inb.datagram_mut(i);
                got.push((d.len(), seg, from));
            }
            if got.len() >= want {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        got
    }

    #[test]
    fn headers_the_kernel_wrote_are_set_again_before_the_next_receive() {
        // Only the headers a receive filled are set up again for the next
        // one: the kernel shortens a header's control length to what it
        // wrote (0 for a plain datagram), so a coalesced datagram in the
        // same slot afterwards must still bring its segment size; senders
        // of both families keep their addresses; a send from the same
        // batch must leave it fit to receive.
        let rx = UdpSocket::bind("[::]:0").unwrap();
        let port = rx.local_addr().unwrap().port();
        let tx = UdpSocket::bind("[::1]:0").unwrap();
        let tx4 = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(enable_gro(rx.as_fd()));
        let to = SocketAddrV6::new(Ipv6Addr::LOCALHOST, port, 0, 0);
        let from = match tx.local_addr().unwrap() {
            std::net::SocketAddr::V6(a) => a,
            _ => unreachable!(),
        };
        let from4 = match tx4.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => {
                SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0)
            }
            _ => unreachable!(),
        };
        let segmented = |out: &mut Batch| {
            for i in 0..4 {
                out.slot_mut(i)[..500].fill(i as u8);
                out.set(i, 500, &to);
            }
            let mut on = true;
            let r = out.send_gso(
                tx.as_fd(),
                4,
                &mut on,
                std::time::Duration::from_millis(100),
            );
            assert_eq!((r.sent, r.messages), (4, 1));
        };
        let mut out = Batch::new(8, 2048);
        let mut inb = Batch::new(8, 65536);
        segmented(&mut out);
        assert_eq!(receive_all(&mut inb, &rx, 1), vec![(2000, Some(500), from)]);
        tx4.send_to(&[7; 100], ("127.0.0.1", port)).unwrap();
        assert_eq!(receive_all(&mut inb, &rx, 1), vec![(100, None, from4)]);
        segmented(&mut out);
        assert_eq!(receive_all(&mut inb, &rx, 1), vec![(2000, Some(500), from)]);
        // The receiving batch sends (a frame forwarded in place), then receives.
        inb.slot_mut(0)[..10].fill(1);
        inb.set(0, 10, &to);
        assert_eq!(inb.send(tx.as_fd(), 1).unwrap(), 1);
        assert_eq!(receive_all(&mut inb, &rx, 1), vec![(10, None, from)]);
        segmented(&mut out);
        tx4.send_to(&[7; 100], ("127.0.0.1", port)).unwrap();
        let got = receive_all(&mut inb, &rx, 2);
        assert_eq!(got, vec![(2000, Some(500), from), (100, None, from4)]);
    }

    #[test]
    fn a_batch_goes_out_and_comes_back_in_one_call_each() {
        let rx = UdpSocket::bind("[::1]:0").unwrap();
        let tx = UdpSocket::bind("[::1]:0").unwrap();
        let to = match rx.local_addr().unwrap() {
            std::net::SocketAddr::V6(a) => a,
            _ => unreachable!(),
        };
        let mut out = Batch::new(8, 2048);
        for i in 0..8 {
            out.slot_mut(i)[..3].copy_from_slice(&[i as u8; 3]);
            out.set(i, 3 + i, &to);
        }
        assert_eq!(out.send(tx.as_fd(), 8).unwrap(), 8);
        let mut inb = Batch::new(16, 2048);
        assert_eq!(receive(&mut inb, rx.as_fd(), 8), 8);
        let from = tx.local_addr().unwrap();
        for i in 0..8 {
            let (d, a) = inb.datagram_mut(i);
            assert_eq!(d.len(), 3 + i);
            assert_eq!(&d[..3], &[i as u8; 3]);
            assert_eq!(std::net::SocketAddr::V6(a), from);
        }
        assert_eq!(
            inb.recv(rx.as_fd()).unwrap(),
            0,
            "nothing waiting: no block, no error"
        );
    }

    #[test]
    fn a_receive_of_one_leaves_the_rest_for_the_next() {
        let rx = UdpSocket::bind("[::1]:0").unwrap();
        let tx = UdpSocket::bind("[::1]:0").unwrap();
        for i in 0..3u8 {
            tx.send_to(&[i; 5], rx.local_addr().unwrap()).unwrap();
        }
        let mut inb = Batch::new(8, 2048);
        // Loopback delivers at once, but give the kernel a moment.
        let ready = std::time::Duration::from_millis(500);
        assert!(crate::poll::readable([rx.as_fd()], ready).unwrap()[0]);
        assert_eq!(inb.recv_up_to(rx.as_fd(), 1).unwrap(), 1);
        assert_eq!(inb.datagram_mut(0).0, &[0u8; 5]);
        assert_eq!(receive(&mut inb, rx.as_fd(), 2), 2, "the two left waiting");
        assert_eq!(inb.datagram_mut(1).0, &[2u8; 5]);
    }

    #[test]
    fn what_the_kernel_refuses_is_named_by_its_slot() {
        let rx = UdpSocket::bind("[::1]:0").unwrap();
        let tx = UdpSocket::bind("[::1]:0").unwrap();
        let to = match rx.local_addr().unwrap() {
            std::net::SocketAddr::V6(a) => a,
            a => panic!("{a}"),
        };
        // Port 0: refused (EINVAL) before anything leaves.
        let nowhere = SocketAddrV6::new(Ipv6Addr::LOCALHOST, 0, 0, 0);
        let patience = std::time::Duration::from_millis(100);
        let mut out = Batch::new(8, 2048);
        for (i, dest) in [to, to, nowhere, nowhere, to, nowhere].iter().enumerate() {
            out.set(i, 100, dest);
        }
        for gso in [true, false] {
            let mut on = gso;
            let r = out.send_gso(tx.as_fd(), 6, &mut on, patience);
            assert_eq!((r.sent, r.refused, r.blocked), (3, 3, 0), "gso {gso}");
            assert_eq!(out.dropped(), &[2, 3, 5], "gso {gso}");
        }
        let r = out.send_one(tx.as_fd(), 3, 100, &nowhere, None, patience);
        assert_eq!((r.sent, r.refused), (0, 1));
        assert_eq!(out.dropped(), &[3]);
        let r = out.send_one(tx.as_fd(), 1, 100, &to, None, patience);
        assert_eq!((r.sent, r.refused), (1, 0));
        assert!(out.dropped().is_empty());
    }

    #[test]
    fn one_datagram_goes_and_comes_without_the_batch_headers() {
        let rx = UdpSocket::bind("[::1]:0").unwrap();
        let tx = UdpSocket::bind("[::1]:0").unwrap();
        let to = match rx.local_addr().unwrap() {
            std::net::SocketAddr::V6(a) => a,
            a => panic!("{a}"),
        };
        let mut out = Batch::new(4, 2048);
        out.slot_mut(2)[..7].copy_from_slice(b"tapir-1");
        let sent = out.send_one(tx.as_fd(), 2, 7, &to, None, std::time::Duration::ZERO);
        assert_eq!((sent.sent, sent.messages, sent.refused), (1, 1, 0));
        let mut inb = Batch::new(4, 2048);
        let ready = std::time::Duration::from_millis(500);
        assert!(crate::poll::readable([rx.as_fd()], ready).unwrap()[0]);
        let one = inb.recv_one(rx.as_fd()).unwrap().expect("one waiting");
        assert_eq!(one.len, 7);
        assert_eq!(one.segment, None);
        assert_eq!(std::net::SocketAddr::V6(one.from), tx.local_addr().unwrap());
        assert_eq!(&inb.slot_mut(0)[..7], b"tapir-1");
        assert_eq!(inb.recv_one(rx.as_fd()).unwrap(), None, "no second");
        // Recorded, slot 0 reads as a batch of one.
        inb.set_received_one(&one);
        let (bytes, from) = inb.datagram_mut(0);
        assert_eq!((bytes.len(), from), (7, one.from));
        assert_eq!(inb.segment_size(0), None);
    }

    #[test]
    fn an_ipv4_sockets_senders_read_as_v4_mapped() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let from = match tx.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => {
                SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0)
            }
            a => panic!("{a}"),
        };
        for i in 0..3u8 {
            tx.send_to(&[i; 9], rx.local_addr().unwrap()).unwrap();
        }
        let ready = std::time::Duration::from_millis(500);
        assert!(crate::poll::readable([rx.as_fd()], ready).unwrap()[0]);
        let mut inb = Batch::new(4, 2048);
        assert_eq!(
            inb.recv_one(rx.as_fd()).unwrap().map(|o| o.from),
            Some(from)
        );
        assert_eq!(
            inb.recv_plain(rx.as_fd()).unwrap().map(|o| o.from),
            Some(from)
        );
        assert_eq!(inb.recv_up_to(rx.as_fd(), 4).unwrap(), 1);
        assert_eq!(inb.datagram_mut(0).1, from);
    }

    #[test]
    fn a_connected_socket_sends_and_receives_without_addresses() {
        let far = UdpSocket::bind("127.0.0.1:0").unwrap();
        let near = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut out = Batch::new(2, 2048);
        out.slot_mut(1)[..4].copy_from_slice(b"wave");
        let patience = std::time::Duration::ZERO;
        assert_eq!(
            out.send_connected(near.as_fd(), 1, 4, patience),
            ConnectedSend::NotConnected,
            "not connected: nothing went"
        );
        near.connect(far.local_addr().unwrap()).unwrap();
        let sent = out.send_connected(near.as_fd(), 1, 4, patience);
        assert!(
            matches!(sent, ConnectedSend::Done(Sent { sent: 1, .. })),
            "{sent:?}"
        );
        let mut buf = [0; 16];
        let (n, from) = far.recv_from(&mut buf).unwrap();
        assert_eq!(
            (&buf[..n], from),
            (&b"wave"[..], near.local_addr().unwrap())
        );
        far.send_to(b"back", from).unwrap();
        let ready = std::time::Duration::from_millis(500);
        assert!(crate::poll::readable([near.as_fd()], ready).unwrap()[0]);
        let peer = SocketAddrV6::new(Ipv6Addr::LOCALHOST, 9, 0, 0);
        let one = out
            .recv_connected(near.as_fd(), peer)
            .unwrap()
            .expect("one");
        assert_eq!((one.len, one.from), (4, peer), "the peer named, not read");
        assert_eq!(&out.slot_mut(0)[..4], b"back");
        assert_eq!(out.recv_connected(near.as_fd(), peer).unwrap(), None);
    }

    /// A receiving socket with `UDP_GRO` on loopback, a sending one, and
    /// the receiver's address.
    fn gro_pair() -> (UdpSocket, UdpSocket, SocketAddrV6) {
        let rx = UdpSocket::bind("[::1]:0").unwrap();
        let tx = UdpSocket::bind("[::1]:0").unwrap();
        assert!(enable_gro(rx.as_fd()), "UDP_GRO (Linux 5.0)");
        let to = match rx.local_addr().unwrap() {
            std::net::SocketAddr::V6(a) => a,
            a => panic!("{a}"),
        };
        (rx, tx, to)
    }

    /// Three datagrams of 500 bytes (0s, 1s, 2s) in one segmented send.
    fn send_three(out: &mut Batch, tx: &UdpSocket, to: &SocketAddrV6) {
        for i in 0..3 {
            out.slot_mut(i)[..500].fill(i as u8);
            out.set(i, 500, to);
        }
        let mut on = true;
        let r = out.send_gso(tx.as_fd(), 3, &mut on, std::time::Duration::ZERO);
        assert_eq!((r.sent, r.messages), (3, 1));
    }

    #[test]
    fn one_receive_says_how_a_coalesced_datagram_is_cut() {
        let (rx, tx, to) = gro_pair();
        let mut out = Batch::new(4, 2048);
        send_three(&mut out, &tx, &to);
        let ready = std::time::Duration::from_millis(500);
        assert!(crate::poll::readable([rx.as_fd()], ready).unwrap()[0]);
        let mut inb = Batch::new(4, 65536);
        let one = inb.recv_one(rx.as_fd()).unwrap().expect("one waiting");
        assert_eq!((one.len, one.segment), (1500, Some(500)));
        inb.set_received_one(&one);
        assert_eq!(inb.segment_size(0), Some(500));
        assert_eq!(inb.datagram_mut(0).0[1000], 2);
    }

    /// What `recv_plain` and turning `UDP_GRO` off rely on: with the option
    /// off, a datagram the kernel coalesced while it was on still comes
    /// whole and no longer says its segment size (by `recvmsg` too), and
    /// those sent after come one by one, to `recvfrom` with their sender.
    #[test]
    fn with_gro_turned_off_what_waits_stays_coalesced_and_what_comes_is_not() {
        let (rx, tx, to) = gro_pair();
        let mut out = Batch::new(4, 2048);
        let send3 = |out: &mut Batch| send_three(out, &tx, &to);
        let ready = std::time::Duration::from_millis(500);
        send3(&mut out);
        assert!(crate::poll::readable([rx.as_fd()], ready).unwrap()[0]);
        assert!(set_gro(rx.as_fd(), false));
        let mut inb = Batch::new(4, 65536);
        let one = inb.recv_one(rx.as_fd()).unwrap().expect("one waiting");
        assert_eq!(
            (one.len, one.segment),
            (1500, None),
            "whole, its size untold"
        );
        send3(&mut out);
        assert!(crate::poll::readable([rx.as_fd()], ready).unwrap()[0]);
        for i in 0..3u8 {
            let one = inb.recv_plain(rx.as_fd()).unwrap().expect("one waiting");
            assert_eq!((one.len, one.segment, one.local), (500, None, None));
            assert_eq!(std::net::SocketAddr::V6(one.from), tx.local_addr().unwrap());
            assert_eq!(inb.slot_mut(0)[499], i);
        }
        assert_eq!(inb.recv_plain(rx.as_fd()).unwrap(), None, "no fourth");
        // On again: coalesced, and said so.
        assert!(set_gro(rx.as_fd(), true));
        send3(&mut out);
        assert!(crate::poll::readable([rx.as_fd()], ready).unwrap()[0]);
        let one = inb.recv_one(rx.as_fd()).unwrap().expect("one waiting");
        assert_eq!((one.len, one.segment), (1500, Some(500)));
    }

    /// Receives into `inb` until `want` datagrams came (or half a second
    /// passed); how many did.
    fn receive(inb: &mut Batch, fd: BorrowedFd<'_>, want: usize) -> usize {
        let mut got = 0;
        for _ in 0..100 {
            got += inb.recv(fd).unwrap();
            if got == want {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        got
    }
}
