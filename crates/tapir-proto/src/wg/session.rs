//! One transport session: sealing and opening data messages in place.
//!
//! Buffer layout for [`Session::seal`]: the caller reads the IP packet into
//! `buf[16..16 + len]`, leaving 16 bytes of headroom for the header and room
//! after it for up to 15 bytes of padding and the 16-byte tag, i.e.
//! `buf.len() >= 16 + round_up(len, 16) + 16`. [`Session::open`] decrypts a
//! received datagram where it lies.
//!
//! Both also come in two halves, so that the cipher work can run outside
//! whatever guards the session (a thread per direction shares one tunnel):
//! [`Session::reserve`] takes the next counter and gives a [`SealJob`] to
//! seal with later; [`Session::opener`] checks a message's counter against
//! the replay window and gives an [`OpenJob`], whose counter
//! [`Session::mark`] records once the message opened. The keys are shared
//! read-only between the halves.

use std::sync::Arc;

use super::crypto::{self, TAG_LEN, TransportKey};
use super::handshake::TransportKeys;
use super::messages::{self, DATA_HEADER_LEN, field};
use super::replay::ReplayWindow;

/// Messages after which a session must not send (whitepaper §6.1).
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);

/// Why a data message was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionError {
    /// The buffer cannot hold the message.
    BufferTooSmall,
    /// The session has sent too many messages and must be replaced.
    Exhausted,
    /// The tag does not verify.
    Decrypt,
    /// The counter was seen before or is too old.
    Replay,
    /// Not a data message.
    Malformed,
}

/// A session's keys and counters. In this order (`repr(C)`): what every
/// message reads first, in one cache line, and the replay window's bitmap
/// (a kilobyte, of which a message touches one word) last.
#[repr(C)]
pub struct Session {
    /// Our index.
    pub local_index: u32,
    /// The peer's index.
    pub remote_index: u32,
    /// Whether we initiated the handshake of this session.
    pub initiator: bool,
    next_send: u64,
    send: Arc<TransportKey>,
    recv: Arc<TransportKey>,
    replay: ReplayWindow,
}

/// The padded length of an IP packet of `len` bytes through a tunnel of
/// MTU `mtu` (0: unknown): a multiple of 16, but never past the MTU, as
/// the kernel module and wireguard-go pad. Padded past it, a packet of the
/// MTU (1420 bytes at the usual 1420) left as 1424 + 32 bytes of UDP: over
/// an IPv6 path of MTU 1500, one byte too many for one datagram, so every
/// full-size packet went out as two IP fragments, and where fragments are
/// dropped, not at all.
pub fn padded(len: usize, mtu: usize) -> usize {
    if mtu == 0 {
        return len.div_ceil(16) * 16;
    }
    // (A packet over the MTU, read before the MTU was lowered: its last
    // MTU-sized unit is what wireguard-go pads.)
    let last = if len > mtu { len % mtu } else { len };
    len - last + (last.div_ceil(16) * 16).min(mtu)
}

/// How a plaintext is padded before it is sealed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    /// An IP packet: to a multiple of 16, but not past the MTU; see
    /// [`padded`].
    Ip {
        /// The device's MTU (0: none known).
        mtu: usize,
    },
    /// An Ethernet frame: not at all (a frame carries no length of its
    /// own, so the receiver takes the plaintext's).
    None,
}

impl Padding {
    /// The padded length of a plaintext of `len` bytes.
    pub fn len(self, len: usize) -> usize {
        match self {
            Padding::Ip { mtu } => padded(len, mtu),
            Padding::None => len,
        }
    }
}

impl Session {
    /// A session from the handshake's keys.
    pub fn new(keys: &TransportKeys) -> Self {
        Self {
            local_index: keys.local_index,
            remote_index: keys.remote_index,
            send: Arc::new(TransportKey::new(&keys.send)),
            recv: Arc::new(TransportKey::new(&keys.recv)),
            next_send: 0,
            replay: ReplayWindow::new(),
            initiator: keys.initiator,
        }
    }

    /// Messages sent so far.
    pub fn sent(&self) -> u64 {
        self.next_send
    }

    /// Test hook: moves the send counter (to reach the rekey and reject limits).
    #[cfg(test)]
    pub(crate) fn set_sent(&mut self, n: u64) {
        self.next_send = n;
    }

    /// Seals the plaintext at `buf[16..16 + len]` (0 for a keepalive),
    /// padded as `pad` says, into a data message at `buf[..n]`, returning
    /// `n`. Needs `buf.len() >= 16 + pad.len(len) + 16`.
    pub fn seal(
        &mut self,
        buf: &mut [u8],
        len: usize,
        pad: Padding,
    ) -> Result<usize, SessionError> {
        self.reserve(pad)?.seal(buf, len)
    }

    /// Takes the next send counter: the message is sealed later with the
    /// returned job, which needs no access to the session.
    pub fn reserve(&mut self, pad: Padding) -> Result<SealJob, SessionError> {
        if self.next_send >= REJECT_AFTER_MESSAGES {
            return Err(SessionError::Exhausted);
        }
        let counter = self.next_send;
        self.next_send += 1;
        Ok(SealJob {
            key: Arc::clone(&self.send),
            receiver: self.remote_index,
            counter,
            pad,
        })
    }

    /// Opens the data message in `buf` in place; the (padded) plaintext is
    /// `buf[16..16 + returned]`. The counter is recorded only if the tag verifies.
    pub fn open(&mut self, buf: &mut [u8]) -> Result<usize, SessionError> {
        let job = self.opener(buf)?;
        let n = job.open(buf)?;
        if !self.mark(job.counter) {
            return Err(SessionError::Replay);
        }
        Ok(n)
    }

    /// The first half of [`Session::open`]: whether the data message in
    /// `buf` may be opened (its counter not seen before, nor too old), and
    /// the job that opens it.
    pub fn opener(&self, buf: &[u8]) -> Result<OpenJob, SessionError> {
        if messages::kind(buf) != Some(messages::Kind::Data) {
            return Err(SessionError::Malformed);
        }
        let counter = messages::read_counter(buf);
        if counter >= REJECT_AFTER_MESSAGES || !self.replay.check(counter) {
            return Err(SessionError::Replay);
        }
        Ok(OpenJob {
            key: Arc::clone(&self.recv),
            counter,
        })
    }

    /// The last half of [`Session::open`]: records the counter of a message
    /// that opened. `false` if it was recorded meanwhile (a replay that
    /// raced the original): the message must then be dropped.
    pub fn mark(&mut self, counter: u64) -> bool {
        self.replay.mark(counter)
    }
}

/// A data message to seal, its counter taken (see [`Session::reserve`]).
pub struct SealJob {
    key: Arc<TransportKey>,
    receiver: u32,
    counter: u64,
    pad: Padding,
}

impl SealJob {
    /// The sealed length of a packet of `len` bytes.
    pub fn sealed_len(&self, len: usize) -> usize {
        DATA_HEADER_LEN + self.pad.len(len) + TAG_LEN
    }

    /// Seals the packet at `buf[16..16 + len]` into a data message at
    /// `buf[..n]`, returning `n` ([`SealJob::sealed_len`]).
    pub fn seal(self, buf: &mut [u8], len: usize) -> Result<usize, SessionError> {
        let total = self.sealed_len(len);
        if buf.len() < total {
            return Err(SessionError::BufferTooSmall);
        }
        let padded = total - DATA_HEADER_LEN - TAG_LEN;
        buf[DATA_HEADER_LEN + len..DATA_HEADER_LEN + padded].fill(0);
        messages::write_type(buf, messages::TYPE_DATA);
        buf[field::DATA_RECEIVER].copy_from_slice(&self.receiver.to_le_bytes());
        buf[field::DATA_COUNTER].copy_from_slice(&self.counter.to_le_bytes());
        crypto::seal_with(
            &self.key,
            self.counter,
            &[],
            &mut buf[DATA_HEADER_LEN..],
            padded,
        );
        Ok(total)
    }
}

/// A data message to open, its counter checked (see [`Session::opener`]).
pub struct OpenJob {
    key: Arc<TransportKey>,
    counter: u64,
}

impl OpenJob {
    /// The message's counter, for [`Session::mark`].
    pub fn counter(&self) -> u64 {
        self.counter
    }

    /// Decrypts the data message in `buf` in place; the (padded) plaintext
    /// is `buf[16..16 + returned]`.
    pub fn open(&self, buf: &mut [u8]) -> Result<usize, SessionError> {
        if buf.len() < DATA_HEADER_LEN + TAG_LEN {
            return Err(SessionError::Malformed);
        }
        if !crypto::open_with(&self.key, self.counter, &[], &mut buf[DATA_HEADER_LEN..]) {
            return Err(SessionError::Decrypt);
        }
        Ok(buf.len() - DATA_HEADER_LEN - TAG_LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions() -> (Session, Session) {
        let a = TransportKeys {
            local_index: 1,
            remote_index: 2,
            send: [1; 32],
            recv: [2; 32],
            initiator: true,
        };
        let b = TransportKeys {
            local_index: 2,
            remote_index: 1,
            send: [2; 32],
            recv: [1; 32],
            initiator: false,
        };
        (Session::new(&a), Session::new(&b))
    }

    const IP: Padding = Padding::Ip { mtu: 1420 };

    #[test]
    fn padding_is_to_16_but_never_past_the_mtu() {
        // As the kernel module and wireguard-go pad (their calculatePaddingSize).
        for (len, mtu, want) in [
            (0, 1420, 0),
            (1, 1420, 16),
            (33, 1420, 48),
            (1408, 1420, 1408),
            (1409, 1420, 1420),
            (1419, 1420, 1420),
            // The MTU itself is not a multiple of 16: a full packet stays whole.
            (1420, 1420, 1420),
            (1280, 1280, 1280),
            (1500, 1500, 1500),
            // Over the MTU (read before it was lowered): its last unit padded.
            (1421, 1420, 1421 + 15),
            (2840, 1420, 2840),
            // No MTU known: to 16 only.
            (1420, 0, 1424),
            (33, 0, 48),
        ] {
            assert_eq!(padded(len, mtu), want, "len {len}, mtu {mtu}");
        }
        assert_eq!(Padding::None.len(33), 33);
        assert_eq!(Padding::Ip { mtu: 1420 }.len(1420), 1420);
    }

    #[test]
    fn seal_open_pad_replay() {
        let (mut a, mut b) = sessions();
        let mut buf = [0u8; 16 + 48 + 16];
        buf[16..16 + 33].copy_from_slice(&[7; 33]);
        let n = a.seal(&mut buf, 33, IP).unwrap();
        assert_eq!(n, 16 + 48 + 16, "padded to 48");
        assert_eq!(messages::read_u32(&buf, field::DATA_RECEIVER), 2);
        let sealed = buf;
        let mut first = sealed;
        assert_eq!(b.open(&mut first[..n]).unwrap(), 48);
        assert_eq!(&first[16..49], &[7; 33]);
        assert_eq!(&first[49..64], &[0; 15], "zero padding");
        let mut again = sealed;
        assert_eq!(b.open(&mut again[..n]), Err(SessionError::Replay));
        let mut forged = sealed;
        forged[20] ^= 1;
        forged[8] = 5; // another counter, so the replay check passes
        assert_eq!(b.open(&mut forged[..n]), Err(SessionError::Decrypt));
        // A failed open does not consume its counter: the genuine message 5 still arrives.
        let mut keepalive = [0u8; 32];
        for _ in 0..5 {
            a.seal(&mut keepalive, 0, IP).unwrap();
        }
        let n = a.seal(&mut keepalive, 0, IP).unwrap();
        assert_eq!(n, 32);
        assert_eq!(messages::read_counter(&keepalive), 6);
        assert_eq!(b.open(&mut keepalive[..n]).unwrap(), 0);
        assert_eq!(
            a.seal(&mut [0u8; 40], 20, IP),
            Err(SessionError::BufferTooSmall)
        );
    }
}
