//! The four WireGuard messages as typed views over bytes (whitepaper §5.4).
//!
//! ```text
//!   1 initiation (148): type | sender | ephemeral 32 | static 32+16 | timestamp 12+16 | mac1 | mac2
//!   2 response    (92): type | sender | receiver | ephemeral 32 | empty 0+16 | mac1 | mac2
//!   3 cookie      (64): type | receiver | nonce 24 | cookie 16+16
//!   4 data      (32+n): type | receiver | counter 8 | packet n (padded to 16) + tag 16
//! ```
//! `type` is one byte followed by three zero bytes; integers are little-endian.

/// Field offsets.
pub mod field {
    use std::ops::Range;
    /// The message type and reserved bytes.
    pub const TYPE: Range<usize> = 0..4;
    /// Initiation: sender index.
    pub const INIT_SENDER: Range<usize> = 4..8;
    /// Initiation: unencrypted ephemeral.
    pub const INIT_EPHEMERAL: Range<usize> = 8..40;
    /// Initiation: encrypted static key.
    pub const INIT_STATIC: Range<usize> = 40..88;
    /// Initiation: encrypted timestamp.
    pub const INIT_TIMESTAMP: Range<usize> = 88..116;
    /// Initiation: mac1.
    pub const INIT_MAC1: Range<usize> = 116..132;
    /// Initiation: mac2.
    pub const INIT_MAC2: Range<usize> = 132..148;
    /// Response: sender index.
    pub const RESP_SENDER: Range<usize> = 4..8;
    /// Response: receiver index.
    pub const RESP_RECEIVER: Range<usize> = 8..12;
    /// Response: unencrypted ephemeral.
    pub const RESP_EPHEMERAL: Range<usize> = 12..44;
    /// Response: encrypted nothing.
    pub const RESP_EMPTY: Range<usize> = 44..60;
    /// Response: mac1.
    pub const RESP_MAC1: Range<usize> = 60..76;
    /// Response: mac2.
    pub const RESP_MAC2: Range<usize> = 76..92;
    /// Cookie reply: receiver index.
    pub const COOKIE_RECEIVER: Range<usize> = 4..8;
    /// Cookie reply: nonce.
    pub const COOKIE_NONCE: Range<usize> = 8..32;
    /// Cookie reply: encrypted cookie.
    pub const COOKIE_SEALED: Range<usize> = 32..64;
    /// Data: receiver index.
    pub const DATA_RECEIVER: Range<usize> = 4..8;
    /// Data: counter.
    pub const DATA_COUNTER: Range<usize> = 8..16;
}

/// Handshake initiation.
pub const TYPE_INITIATION: u8 = 1;
/// Handshake response.
pub const TYPE_RESPONSE: u8 = 2;
/// Cookie reply.
pub const TYPE_COOKIE: u8 = 3;
/// Transport data.
pub const TYPE_DATA: u8 = 4;

/// Length of an initiation.
pub const INITIATION_LEN: usize = 148;
/// Length of a response.
pub const RESPONSE_LEN: usize = 92;
/// Length of a cookie reply.
pub const COOKIE_LEN: usize = 64;
/// Header of a data message.
pub const DATA_HEADER_LEN: usize = 16;
/// Smallest data message: header and tag (a keepalive).
pub const DATA_MIN_LEN: usize = 32;

/// What a datagram claims to be, checked for length only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A handshake initiation of the right length.
    Initiation,
    /// A handshake response of the right length.
    Response,
    /// A cookie reply of the right length.
    Cookie,
    /// A data message at least as long as a keepalive.
    Data,
}

/// Classifies a datagram; `None` for anything WireGuard does not send.
pub fn kind(datagram: &[u8]) -> Option<Kind> {
    let head = datagram.get(field::TYPE)?;
    if head[1..] != [0, 0, 0] {
        return None;
    }
    match (head[0], datagram.len()) {
        (TYPE_INITIATION, INITIATION_LEN) => Some(Kind::Initiation),
        (TYPE_RESPONSE, RESPONSE_LEN) => Some(Kind::Response),
        (TYPE_COOKIE, COOKIE_LEN) => Some(Kind::Cookie),
        (TYPE_DATA, n) if n >= DATA_MIN_LEN => Some(Kind::Data),
        _ => None,
    }
}

/// The size of the messages `datagram` joins, where it is several of one
/// size back to back as a sender's segmentation or the kernel's coalescing
/// (`UDP_GRO`) make them (the last may be shorter, and of another kind), for
/// a receive that was not told so. Each message but the last starts as the
/// first does: its type and, for data, its receiver index (the same in
/// each message of a session: in ciphertext 2^-64 likely); the last is any
/// message of its length. Data is also taken with one handshake message
/// after it (a rekey's initiation sent with the data before it), by that
/// message's fixed length. `None` for anything else: a lone message, and
/// a run that crosses from one session to the next (its messages do not
/// open, as before).
pub fn coalesced_size(datagram: &[u8]) -> Option<usize> {
    let d = datagram;
    let len = d.len();
    let head = d.get(..8)?;
    if head[1..4] != [0, 0, 0] {
        return None;
    }
    // Whether a message of `n` bytes can start at `at`.
    let message = |at: usize, n: usize| {
        d.get(at..at + 4).is_some_and(|h| {
            h[1..] == [0, 0, 0]
                && match h[0] {
                    TYPE_INITIATION => n == INITIATION_LEN,
                    TYPE_RESPONSE => n == RESPONSE_LEN,
                    TYPE_COOKIE => n == COOKIE_LEN,
                    TYPE_DATA => n >= DATA_MIN_LEN,
                    _ => false,
                }
        })
    };
    // Whether `d` is messages of `size` bytes, each but the last starting
    // with the first's `mark` bytes.
    let run = |size: usize, mark: usize| {
        if size >= len || !message(0, size) {
            return false;
        }
        let mut at = size;
        while len - at > size {
            if !d[at..].starts_with(&head[..mark]) {
                return false;
            }
            at += size;
        }
        message(at, len - at)
    };
    let fixed = match head[0] {
        TYPE_INITIATION => INITIATION_LEN,
        TYPE_RESPONSE => RESPONSE_LEN,
        TYPE_COOKIE => COOKIE_LEN,
        TYPE_DATA => {
            // The first 8 bytes again: a run of one session's messages.
            let mut from = DATA_MIN_LEN;
            while from + 8 <= len {
                let Some(at) = d[from..].windows(8).position(|w| w == head) else {
                    break;
                };
                let size = from + at;
                if run(size, 8) {
                    return Some(size);
                }
                from = size + 1;
            }
            // One data message and a handshake message after it.
            return [INITIATION_LEN, RESPONSE_LEN, COOKIE_LEN]
                .into_iter()
                .filter_map(|n| {
                    len.checked_sub(n)
                        .filter(|&size| size >= n.max(DATA_MIN_LEN))
                })
                .find(|&size| message(size, len - size));
        }
        _ => return None,
    };
    run(fixed, 4).then_some(fixed)
}

/// Reads a little-endian u32 field.
pub fn read_u32(buf: &[u8], range: std::ops::Range<usize>) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[range]);
    u32::from_le_bytes(b)
}

/// Reads the little-endian counter of a data message.
pub fn read_counter(buf: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[field::DATA_COUNTER]);
    u64::from_le_bytes(b)
}

/// Writes a message type with its reserved zeros.
pub fn write_type(buf: &mut [u8], kind: u8) {
    buf[field::TYPE].copy_from_slice(&[kind, 0, 0, 0]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_by_type_and_length() {
        let mut m = vec![0u8; 148];
        m[0] = 1;
        assert_eq!(kind(&m), Some(Kind::Initiation));
        assert_eq!(kind(&m[..147]), None);
        m[1] = 1;
        assert_eq!(kind(&m), None, "reserved bytes must be zero");
        let mut d = vec![0u8; 32];
        d[0] = 4;
        assert_eq!(kind(&d), Some(Kind::Data));
        assert_eq!(kind(&d[..31]), None);
        assert_eq!(kind(&[]), None);
        assert_eq!(kind(&[9, 0, 0, 0]), None);
    }

    /// Bytes that look like ciphertext (xorshift from `seed`).
    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A data message of `len` bytes for receiver `index`, counter `n`.
    fn data(index: u32, n: u64, len: usize) -> Vec<u8> {
        let mut m = noise(n ^ u64::from(index) << 32, len);
        write_type(&mut m, TYPE_DATA);
        m[field::DATA_RECEIVER].copy_from_slice(&index.to_le_bytes());
        m[field::DATA_COUNTER].copy_from_slice(&n.to_le_bytes());
        m
    }

    #[test]
    fn coalesced_data_messages_are_told_apart_by_their_size() {
        for size in [32, 33, 48, 100, 128, 1452, 1500] {
            for count in 2..6 {
                for last in [size, (size - 1).max(32), 32] {
                    let mut d = Vec::new();
                    for n in 0..count {
                        let len = if n + 1 == count { last } else { size };
                        d.extend(data(0xdead_beef, 7 + n as u64, len));
                    }
                    assert_eq!(
                        coalesced_size(&d),
                        Some(size),
                        "{count} of {size}, the last {last}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_lone_message_is_not_taken_for_several() {
        for seed in 0..2000u64 {
            let len = 32 + (seed as usize * 37) % 1500;
            assert_eq!(
                coalesced_size(&data(seed as u32, seed, len)),
                None,
                "seed {seed}"
            );
        }
        // Its own first bytes inside it once (a keepalive's worth from the
        // end), but not at the multiples of that place: one message.
        let mut m = data(5, 1, 200);
        let head = m[..8].to_vec();
        m[90..98].copy_from_slice(&head);
        assert_eq!(coalesced_size(&m), None);
        // ... where the rest is too short for a message: one message.
        let mut m = data(5, 1, 100);
        m[80..88].copy_from_slice(&head);
        assert_eq!(coalesced_size(&m), None);
        // Two sessions' messages (a rekey between them): not one run.
        let mut d = data(1, 1000, 100);
        d.extend(data(2, 1000, 100));
        d.extend(data(2, 1001, 100));
        assert_eq!(coalesced_size(&d), None);
        // Too short, not WireGuard.
        assert_eq!(coalesced_size(&data(1, 1, 63)), None);
        assert_eq!(coalesced_size(&[4, 0, 0]), None);
        let mut x = data(1, 1, 100);
        x.extend(data(1, 2, 100));
        x[1] = 1;
        assert_eq!(coalesced_size(&x), None);
    }

    #[test]
    fn a_run_of_data_may_end_in_a_handshake_message_or_another_sessions_data() {
        let mut init = noise(1, INITIATION_LEN);
        write_type(&mut init, TYPE_INITIATION);
        let mut resp = noise(2, RESPONSE_LEN);
        write_type(&mut resp, TYPE_RESPONSE);
        for tail in [&init, &resp] {
            for count in 1..4 {
                let mut d = Vec::new();
                for n in 0..count {
                    d.extend(data(7, n, 1060));
                }
                d.extend(tail.iter());
                assert_eq!(
                    coalesced_size(&d),
                    Some(1060),
                    "{count} then {}",
                    tail.len()
                );
            }
        }
        // The last of a run from the next session.
        let mut d = data(7, 1, 500);
        d.extend(data(7, 2, 500));
        d.extend(data(9, 1, 300));
        assert_eq!(coalesced_size(&d), Some(500));
        // A handshake message cannot follow shorter data (each but the
        // last is as long as the first, the last no longer).
        let mut d = data(7, 1, 100);
        d.extend(init.iter());
        assert_eq!(coalesced_size(&d), None);
        // Handshake runs may end in data.
        let mut d = [init.clone(), init.clone()].concat();
        d.extend(data(3, 1, 100));
        assert_eq!(coalesced_size(&d), Some(INITIATION_LEN));
    }

    #[test]
    fn coalesced_handshake_messages_are_told_apart_by_their_length() {
        for (t, len) in [
            (TYPE_INITIATION, INITIATION_LEN),
            (TYPE_RESPONSE, RESPONSE_LEN),
            (TYPE_COOKIE, COOKIE_LEN),
        ] {
            let mut one = noise(len as u64, len);
            write_type(&mut one, t);
            assert_eq!(coalesced_size(&one), None);
            let two = [one.clone(), one.clone()].concat();
            assert_eq!(coalesced_size(&two), Some(len));
            assert_eq!(coalesced_size(&two[..len * 2 - 1]), None);
            let three = [one.clone(), one.clone(), one.clone()].concat();
            assert_eq!(coalesced_size(&three), Some(len));
        }
        let mut i = vec![0; INITIATION_LEN];
        write_type(&mut i, TYPE_INITIATION);
        let mut r = vec![0; INITIATION_LEN];
        write_type(&mut r, TYPE_RESPONSE);
        assert_eq!(coalesced_size(&[i, r].concat()), None);
    }
}
