//! The TCP transport's deframer: any byte stream, cut into reads of any
//! sizes, never panics, never hands out a frame that is not a whole,
//! plausible WireGuard message, and hands out the same frames however the
//! stream is cut.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tapir_wire::tcpframe::{Deframer, MAX_MESSAGE, MIN_MESSAGE};

fn frames(data: &[u8], cut: usize) -> (Vec<Vec<u8>>, bool) {
    let mut d = Deframer::new(MAX_MESSAGE);
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        // A read of at most `cut` bytes, as much as there is room for.
        let space = d.space();
        assert!(!space.is_empty(), "a drained deframer always has room");
        let n = space.len().min(cut.max(1)).min(rest.len());
        space[..n].copy_from_slice(&rest[..n]);
        d.filled(n);
        rest = &rest[n..];
        assert!(d.capacity() <= 2 * (MAX_MESSAGE + 2) + 2 * 4096);
        loop {
            match d.next_frame() {
                Ok(Some(m)) => {
                    assert!(m.len() >= MIN_MESSAGE);
                    assert!((1..=4).contains(&m[0]) && m[1..4] == [0, 0, 0]);
                    out.push(m.to_vec());
                }
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

fuzz_target!(|input: (u8, &[u8])| {
    let (cut, data) = input;
    let (whole, failed_whole) = frames(data, data.len());
    let (pieces, failed_pieces) = frames(data, usize::from(cut));
    if !failed_whole && !failed_pieces {
        assert_eq!(whole, pieces);
    }
});
