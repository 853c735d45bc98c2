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

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

/// Counter (8 bytes, after 8 of padding), then the sealed packet and its tag.
const HEADER: usize = 16;
const TAG: usize = 16;

fn tun(name: &str) -> std::io::Result<OwnedFd> {
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
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one live ifreq.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, name, port, peer] = &args[..] else {
        eprintln!("usage: tapir-floor DEVICE LISTEN_PORT PEER_ADDR:PORT");
        std::process::exit(2);
    };
    let dev = tun(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    let port: u16 = port.parse().expect("LISTEN_PORT: a port number");
    let peer: SocketAddr = peer.parse().expect("PEER_ADDR:PORT");
    let socket = UdpSocket::bind(("0.0.0.0", port)).expect("bind");
    socket.set_nonblocking(true).expect("non-blocking");
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[7; 32]).expect("key"));
    let mut buf = vec![0u8; HEADER + 65536 + TAG];
    let mut sent: u64 = 0;
    let mut fds = [
        libc::pollfd {
            fd: dev.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: poll reads and writes two live pollfds.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            continue;
        }
        if fds[0].revents != 0 {
            loop {
                let room = &mut buf[HEADER..HEADER + 65536];
                // SAFETY: read writes at most room.len() bytes into room.
                let n =
                    unsafe { libc::read(dev.as_raw_fd(), room.as_mut_ptr().cast(), room.len()) };
                if n <= 0 {
                    break;
                }
                let n = n as usize;
                sent += 1;
                buf[8..HEADER].copy_from_slice(&sent.to_le_bytes());
                let packet = &mut buf[HEADER..HEADER + n];
                let Ok(tag) = key.seal_in_place_separate_tag(nonce(sent), Aad::empty(), packet)
                else {
                    continue;
                };
                buf[HEADER + n..HEADER + n + TAG].copy_from_slice(tag.as_ref());
                let _ = socket.send_to(&buf[..HEADER + n + TAG], peer);
            }
        }
        if fds[1].revents != 0 {
            while let Ok(n) = socket.recv(&mut buf) {
                if n < HEADER + TAG {
                    continue;
                }
                let counter = u64::from_le_bytes(buf[8..HEADER].try_into().expect("8 bytes"));
                let Ok(packet) =
                    key.open_in_place(nonce(counter), Aad::empty(), &mut buf[HEADER..n])
                else {
                    continue;
                };
                // SAFETY: write reads packet.len() bytes from a live slice.
                unsafe { libc::write(dev.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
            }
        }
    }
}
