//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624).

/// Adds `data` as big-endian 16-bit words to `sum` (an odd last byte is
/// padded with zero). Fold with [`finish`].
///
/// 32-bit words in the machine's own byte order, each into one of eight
/// 64-bit lanes, a loop the compiler turns into SIMD adds (SSE2 on any
/// x86-64: 25 GB/s a core became 41-55 at 1380-1400 bytes): the
/// one's-complement sum does not depend on byte order but for a swap of the
/// folded result (RFC 1071, 2(B)), and 2^32 = 1 modulo 0xffff, so the wide
/// sum folds to the same value as the 16-bit words'. This is the TSO path's
/// per-segment cost (and the check of every TCP segment before coalescing),
/// so it matters.
pub fn add(sum: u32, data: &[u8]) -> u32 {
    let (words, tail) = data.split_at(data.len() & !3);
    let mut folded: u64 = 0;
    // A lane takes at most 2^25 words of a GiB block: it cannot overflow.
    for block in words.chunks(1 << 30) {
        let mut lanes = [0u64; 8];
        let mut chunks = block.chunks_exact(32);
        for c in &mut chunks {
            for (lane, w) in lanes.iter_mut().zip(c.chunks_exact(4)) {
                *lane += u64::from(u32::from_ne_bytes(w.try_into().expect("4 bytes")));
            }
        }
        let mut wide: u64 = lanes.iter().sum();
        for w in chunks.remainder().chunks_exact(4) {
            wide += u64::from(u32::from_ne_bytes(w.try_into().expect("4 bytes")));
        }
        folded += fold(wide);
    }
    // Back to network order, then the last 0-3 bytes (at an even offset).
    let mut acc = u64::from(u16::from_be(fold(folded) as u16)) + u64::from(sum);
    let mut rest = tail.chunks_exact(2);
    for c in &mut rest {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = rest.remainder() {
        acc += u64::from(*last) << 8;
    }
    // 16 bits plus a carry: stays a valid running sum for `add`/`finish`.
    fold(acc) as u32
}

/// End-around carries down to 16 bits.
fn fold(mut acc: u64) -> u64 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

/// Folds a running sum into the one's-complement checksum field value.
pub fn finish(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The checksum of `data` alone (IPv4 header, ICMPv4 message).
pub fn checksum(data: &[u8]) -> u16 {
    finish(add(0, data))
}

/// Whether `data`, checksum field included, sums to the all-ones word.
pub fn verify(data: &[u8]) -> bool {
    checksum(data) == 0
}

/// The IPv6 pseudo-header sum (RFC 8200 §8.1) for an upper-layer message.
pub fn ipv6_pseudo(src: &[u8; 16], dst: &[u8; 16], upper_len: u32, next_header: u8) -> u32 {
    let sum = add(add(0, src), dst);
    let sum = add(sum, &upper_len.to_be_bytes());
    add(sum, &[0, 0, 0, next_header])
}

/// Updates checksum `check` after a 16-bit word changed from `old` to `new`
/// (RFC 1624, equation 3: `HC' = ~(~HC + ~m + m')`), without touching the rest.
pub fn update16(check: u16, old: u16, new: u16) -> u16 {
    let sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    finish(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071's definition, word by word: the model for the fast version.
    fn slow(data: &[u8]) -> u16 {
        let mut sum: u64 = 0;
        for (i, b) in data.iter().enumerate() {
            sum += if i % 2 == 0 {
                u64::from(*b) << 8
            } else {
                u64::from(*b)
            };
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn the_wide_sum_agrees_with_the_definition() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in (0..200).chain([1419, 1420, 65535]) {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            assert_eq!(checksum(&data), slow(&data), "len {len}");
            assert_eq!(
                checksum(&vec![0xff; len]),
                slow(&vec![0xff; len]),
                "ones, len {len}"
            );
            assert_eq!(checksum(&vec![0; len]), 0xffff, "zeros, len {len}");
        }
        // A running sum carried in, with every length and content above.
        for len in [0usize, 1, 7, 8, 31, 32, 33, 63, 64, 65, 1420] {
            let data: Vec<u8> = (0..len)
                .map(|i| (i as u8).wrapping_mul(151) ^ 0x5a)
                .collect();
            for start in [0u32, 1, 0xfffe, 0xffff, 0x1_0000, 0x1_fffe] {
                let mut with: Vec<u8> = vec![(start >> 8) as u8, start as u8];
                with.extend_from_slice(&data);
                // `start` above 0xffff: its carry folds in as one more word.
                let carry = start >> 16;
                let expected = finish(add(0, &with) + carry);
                assert_eq!(
                    finish(add(start & 0xffff, &data) + carry),
                    expected,
                    "len {len} start {start:#x}"
                );
                assert_eq!(
                    finish(add(start, &data)),
                    expected,
                    "len {len} start {start:#x}"
                );
            }
        }
        // Running sums chain: add(add(0, a), b) == add(0, a ++ b) for even a.
        let (a, b) = ([0xfeu8; 20], [0x7fu8; 33]);
        let joined: Vec<u8> = a.iter().chain(&b).copied().collect();
        assert_eq!(finish(add(add(0, &a), &b)), checksum(&joined));
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (checksum 220d).
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&data), !0xddf2);
        assert_eq!(checksum(&[0x12]), !0x1200, "odd length pads with zero");
    }

    #[test]
    fn ipv4_header_from_a_capture() {
        // IPv4 header of `ping -c1 -s 8 10.0.0.2` from 10.0.0.1, read from a tun
        // device on Linux 6.18.
        #[rustfmt::skip]
        let header = [
            0x45, 0x00, 0x00, 0x24, 0x3c, 0xe4, 0x40, 0x00, 0x40, 0x01,
            0xe9, 0xf2, // checksum
            0x0a, 0x00, 0x00, 0x01, 0x0a, 0x00, 0x00, 0x02,
        ];
        assert!(verify(&header));
        let mut zeroed = header;
        zeroed[10..12].fill(0);
        assert_eq!(checksum(&zeroed), 0xe9f2);
    }

    #[test]
    fn incremental_equals_recomputed() {
        // Every change of one word in a few messages: update16 must agree
        // with a full recomputation (RFC 1624's point: no -0 trouble).
        let base: Vec<u8> = (0u8..40).map(|i| i.wrapping_mul(37)).collect();
        for pos in (0..38).step_by(2) {
            for new in [0x0000u16, 0xffff, 0x0800, 0x1234, 0xfffe] {
                let mut msg = base.clone();
                msg[38..40].fill(0);
                let c = checksum(&msg);
                msg[38..40].copy_from_slice(&c.to_be_bytes());
                let old = u16::from_be_bytes([msg[pos], msg[pos + 1]]);
                msg[pos..pos + 2].copy_from_slice(&new.to_be_bytes());
                let updated = update16(c, old, new);
                msg[38..40].copy_from_slice(&updated.to_be_bytes());
                assert!(verify(&msg), "pos {pos} new {new:#x}");
            }
        }
    }
}
