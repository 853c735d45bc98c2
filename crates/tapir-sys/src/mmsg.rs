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

use std::io;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd};

/// Reusable buffers for up to `N` datagrams of `slot` bytes.
pub struct Batch {
    data: Vec<u8>,
    slot: usize,
    lens: Vec<usize>,
    addrs: Vec<libc::sockaddr_in6>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

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
        }
    }

    /// How many datagrams it holds.
    pub fn capacity(&self) -> usize {
        self.lens.len()
    }

    /// Slot `i`, to fill before [`Batch::set`].
    pub fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.data[i * self.slot..(i + 1) * self.slot]
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

    /// Marks slot `i` as a datagram of `len` bytes for `to`.
    pub fn set(&mut self, i: usize, len: usize, to: &SocketAddrV6) {
        self.lens[i] = len.min(self.slot);
        self.addrs[i] = to_sockaddr(to);
    }

    /// Points the headers at the first `n` slots.
    fn prepare(&mut self, n: usize, lens_from_slots: bool) {
        let base = self.data.as_mut_ptr();
        for i in 0..n {
            self.iovs[i] = libc::iovec {
                // SAFETY: i < count, so the offset stays inside `data`.
                iov_base: unsafe { base.add(i * self.slot) }.cast(),
                iov_len: if lens_from_slots {
                    self.slot
                } else {
                    self.lens[i]
                },
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in6).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
    }

    /// Receives up to `capacity` datagrams without blocking; returns how many
    /// (0 when none is waiting).
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        let n = self.capacity();
        self.prepare(n, true);
        // SAFETY: the headers point at `n` iovecs, address buffers and slots
        // owned by `self`, valid and unaliased for the call; the kernel writes
        // at most the lengths given.
        let rc = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(0)
            } else {
                Err(e)
            };
        }
        let got = rc as usize;
        for i in 0..got {
            self.lens[i] = self.hdrs[i].msg_len as usize;
            if self.hdrs[i].msg_hdr.msg_namelen as usize
                != std::mem::size_of::<libc::sockaddr_in6>()
            {
                self.addrs[i] = empty_sockaddr();
            }
        }
        Ok(got)
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
            let rc = unsafe {
                libc::sendmmsg(
                    fd.as_raw_fd(),
                    self.hdrs[sent..].as_mut_ptr(),
                    (n - sent) as libc::c_uint,
                    0,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return Ok(sent),
                    // A bad descriptor is our bug: report it.
                    _ if e.raw_os_error() == Some(libc::EBADF) => return Err(e),
                    // Anything else fails only the datagram at the head
                    // (EMSGSIZE, an unreachable peer, a firewall's EPERM):
                    // drop it, as UDP may, and go on with the rest.
                    _ => {
                        sent += 1;
                        continue;
                    }
                }
            }
            sent += rc as usize;
        }
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;

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
        let mut got = 0;
        for _ in 0..100 {
            got += inb.recv(rx.as_fd()).unwrap();
            if got == 8 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(got, 8);
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
}
