//! The TCP transport's framing: each WireGuard message preceded by its
//! length as a 16-bit big-endian integer, and nothing else. It is the framing
//! of Mullvad's udp-over-tcp relays (`udp2tcp`, `tcp2udp`), so stock
//! WireGuard behind such a relay talks to tapir.
//!
//! ```text
//!   stream:  | len u16 BE | message (len bytes) | len u16 BE | message | ...
//!   read(fd) ─▶ Deframer::space() / filled(n) ─▶ next_frame() ─▶ Some(&mut message) | None (need more)
//!                                                     └▶ Err(FrameError): close this connection
//! ```
//! A message may arrive split across reads, and one read may bring several.
//! A frame that cannot be a WireGuard message (too short, too long, an
//! unknown type, non-zero reserved bytes) is an error: nothing after it on
//! that stream can be trusted to be aligned, so the connection is closed.

use std::ops::Range;

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 2;
/// The shortest WireGuard message (a keepalive: header and tag).
pub const MIN_MESSAGE: usize = 32;
/// The longest frame the prefix can announce.
pub const MAX_MESSAGE: usize = u16::MAX as usize;
/// Bytes a deframer holds at first, and reads at most at a time.
pub const INITIAL_BUFFER: usize = 4096;

/// Why a stream was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// A zero-length frame.
    Empty,
    /// A frame shorter than any WireGuard message.
    Short(usize),
    /// A frame longer than this end accepts.
    Oversized(usize),
    /// Not a WireGuard message (its first four bytes).
    Garbage([u8; 4]),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Empty => write!(f, "a zero-length frame"),
            Self::Short(n) => write!(f, "a {n}-byte frame, shorter than any WireGuard message"),
            Self::Oversized(n) => write!(f, "a {n}-byte frame, longer than accepted"),
            Self::Garbage(b) => write!(
                f,
                "not a WireGuard message (starts {:02x} {:02x} {:02x} {:02x})",
                b[0], b[1], b[2], b[3]
            ),
        }
    }
}

/// The length prefix for a message of `len` bytes (`None` if it does not fit).
pub fn header(len: usize) -> Option<[u8; HEADER_LEN]> {
    u16::try_from(len).ok().map(u16::to_be_bytes)
}

/// Reassembles messages from a byte stream in one buffer, which starts at
/// [`INITIAL_BUFFER`] bytes and grows only as far as a frame announced on
/// the stream needs (at most the largest frame plus one read): an idle or
/// unauthenticated connection costs little.
#[derive(Debug)]
pub struct Deframer {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max: usize,
}

impl Deframer {
    /// A deframer that accepts messages of up to `max` bytes (at most [`MAX_MESSAGE`]).
    pub fn new(max: usize) -> Self {
        let max = max.clamp(MIN_MESSAGE, MAX_MESSAGE);
        Self {
            buf: vec![0; INITIAL_BUFFER],
            start: 0,
            end: 0,
            max,
        }
    }

    /// Bytes received and not yet handed out.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Where the next read goes (never empty while [`Deframer::next_frame`] is
    /// drained between reads).
    pub fn space(&mut self) -> &mut [u8] {
        // What the frame at the head needs in all (its length is known once
        // its prefix is here; a valid one is at most `max`).
        let avail = &self.buf[self.start..self.end];
        let need = if avail.len() >= HEADER_LEN {
            HEADER_LEN + usize::from(u16::from_be_bytes([avail[0], avail[1]])).min(self.max)
        } else {
            HEADER_LEN + MIN_MESSAGE
        };
        if self.start > 0 && (self.end == self.buf.len() || self.buf.len() - self.start < need) {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.start < need || self.end == self.buf.len() {
            let grown = (self.start + need + INITIAL_BUFFER).max(self.buf.len());
            self.buf.resize(grown, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Whether a whole frame (or a frame that will be refused) is buffered,
    /// so that [`Deframer::next_frame`] has something to say without a read.
    pub fn has_frame(&self) -> bool {
        let avail = &self.buf[self.start..self.end];
        if avail.len() < HEADER_LEN {
            return false;
        }
        let len = usize::from(u16::from_be_bytes([avail[0], avail[1]]));
        len < MIN_MESSAGE || len > self.max || avail.len() >= HEADER_LEN + len
    }

    /// Bytes of buffer held now.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Records that `n` bytes were read into [`Deframer::space`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// The next whole message, to open in place, or `None` until more bytes arrive.
    pub fn next_frame(&mut self) -> Result<Option<&mut [u8]>, FrameError> {
        match self.next_range()? {
            Some(r) => Ok(Some(&mut self.buf[r])),
            None => Ok(None),
        }
    }

    fn next_range(&mut self) -> Result<Option<Range<usize>>, FrameError> {
        let avail = &self.buf[self.start..self.end];
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = usize::from(u16::from_be_bytes([avail[0], avail[1]]));
        match len {
            0 => return Err(FrameError::Empty),
            n if n < MIN_MESSAGE => return Err(FrameError::Short(n)),
            n if n > self.max => return Err(FrameError::Oversized(n)),
            _ => {}
        }
        // The type (1 to 4) and three reserved zero bytes are checked as soon
        // as they are here, so garbage is refused before it fills a buffer.
        if avail.len() >= HEADER_LEN + 4 {
            let head: [u8; 4] = avail[HEADER_LEN..HEADER_LEN + 4]
                .try_into()
                .expect("4 bytes");
            if !(1..=4).contains(&head[0]) || head[1..] != [0, 0, 0] {
                return Err(FrameError::Garbage(head));
            }
        }
        if avail.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let at = self.start + HEADER_LEN;
        self.start += HEADER_LEN + len;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            // The range stays valid: the bytes are not touched until the next read.
        }
        Ok(Some(at..at + len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A keepalive-sized data message (type 4) of `len` bytes, filled with `b`.
    fn message(len: usize, b: u8) -> Vec<u8> {
        let mut m = vec![b; len];
        m[..4].copy_from_slice(&[4, 0, 0, 0]);
        m
    }

    fn framed(msgs: &[Vec<u8>]) -> Vec<u8> {
        msgs.iter()
            .flat_map(|m| {
                header(m.len())
                    .unwrap()
                    .into_iter()
                    .chain(m.iter().copied())
            })
            .collect()
    }

    /// What a read loop does: reads what fits, hands out frames, reads on.
    fn feed(d: &mut Deframer, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let space = d.space();
            let n = space.len().min(bytes.len());
            space[..n].copy_from_slice(&bytes[..n]);
            d.filled(n);
            bytes = &bytes[n..];
            if !bytes.is_empty() {
                // Only a frame that is complete leaves room: the caller would drain it here.
                assert!(n > 0);
            }
        }
    }

    #[test]
    fn the_prefix_is_a_big_endian_length() {
        // As udp2tcp writes a 148-byte initiation: 0x00 0x94.
        assert_eq!(header(148), Some([0x00, 0x94]));
        assert_eq!(header(65535), Some([0xff, 0xff]));
        assert_eq!(header(65536), None);
    }

    #[test]
    fn several_frames_in_one_read_and_one_frame_across_many() {
        let msgs = vec![message(32, 1), message(148, 2), message(1452, 3)];
        let stream = framed(&msgs);
        // All at once.
        let mut d = Deframer::new(MAX_MESSAGE);
        feed(&mut d, &stream);
        for m in &msgs {
            assert_eq!(d.next_frame().unwrap().unwrap(), &m[..]);
        }
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.buffered(), 0);
        assert!(!d.has_frame());
        // Half a frame is not a frame.
        let half = framed(&[message(1000, 7)]);
        feed(&mut d, &half[..500]);
        assert!(!d.has_frame());
        feed(&mut d, &half[500..]);
        assert!(d.has_frame());
        // A byte at a time.
        let mut d = Deframer::new(MAX_MESSAGE);
        let mut got = Vec::new();
        for b in &stream {
            feed(&mut d, &[*b]);
            while let Some(m) = d.next_frame().unwrap() {
                got.push(m.to_vec());
            }
        }
        assert_eq!(got, msgs);
    }

    #[test]
    fn a_long_stream_compacts_instead_of_growing() {
        let mut d = Deframer::new(2000);
        let stream = framed(&vec![message(1452, 9); 1000]);
        let mut n = 0;
        for chunk in stream.chunks(1000) {
            feed(&mut d, chunk);
            while let Some(m) = d.next_frame().unwrap() {
                assert_eq!(m.len(), 1452);
                n += 1;
            }
        }
        assert_eq!(n, 1000);
    }

    #[test]
    fn the_buffer_grows_only_for_frames_that_need_it() {
        let mut d = Deframer::new(MAX_MESSAGE);
        assert_eq!(d.capacity(), INITIAL_BUFFER);
        let small = framed(&vec![message(1452, 1); 20]);
        for chunk in small.chunks(700) {
            feed(&mut d, chunk);
            while d.next_frame().unwrap().is_some() {}
        }
        assert_eq!(
            d.capacity(),
            INITIAL_BUFFER,
            "1452-byte frames fit as they are"
        );
        let big = framed(&[message(60000, 2)]);
        let mut got = 0;
        for chunk in big.chunks(INITIAL_BUFFER) {
            feed(&mut d, chunk);
            while let Some(m) = d.next_frame().unwrap() {
                assert_eq!(m.len(), 60000);
                got += 1;
            }
        }
        assert_eq!(got, 1);
        assert!(
            d.capacity() <= 60002 + 2 * INITIAL_BUFFER,
            "{}",
            d.capacity()
        );
    }

    #[test]
    fn bad_frames_are_refused() {
        let mut d = Deframer::new(2000);
        feed(&mut d, &[0, 0]);
        assert_eq!(d.next_frame(), Err(FrameError::Empty));
        let mut d = Deframer::new(2000);
        feed(&mut d, &[0, 31]);
        assert_eq!(d.next_frame(), Err(FrameError::Short(31)));
        let mut d = Deframer::new(2000);
        feed(&mut d, &[0x07, 0xd1]);
        assert_eq!(d.next_frame(), Err(FrameError::Oversized(2001)));
        // HTTP, say: refused as soon as the type is visible.
        let mut d = Deframer::new(MAX_MESSAGE);
        feed(&mut d, b"GET / HTTP/1.1\r\n");
        assert!(matches!(
            d.next_frame(),
            Err(FrameError::Short(_)) | Err(FrameError::Garbage(_))
        ));
        let mut d = Deframer::new(MAX_MESSAGE);
        feed(&mut d, &[0, 40, 5, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(FrameError::Garbage([5, 0, 0, 0])));
        let mut d = Deframer::new(MAX_MESSAGE);
        feed(&mut d, &[0, 40, 1, 0, 1, 0]);
        assert_eq!(d.next_frame(), Err(FrameError::Garbage([1, 0, 1, 0])));
        assert!(
            FrameError::Garbage([5, 0, 0, 0])
                .to_string()
                .contains("05 00 00 00")
        );
    }
}
