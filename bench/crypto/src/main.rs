//! Seal and open with ChaCha20-Poly1305, in place, as tapir's datapath does
//! (a 100-byte ping, a 1420-byte packet, a 64 KiB super-packet), with three audited crates:
//! RustCrypto's `chacha20poly1305`, `ring` (tapir's) and `aws-lc-rs`; and with
//! the system's OpenSSL 3 through the `openssl` crate's EVP context (one kept a
//! direction; a new nonce, the data and the tag each message, as a tunnel must),
//! whose AVX-512 code is the fastest on long inputs but whose EVP calls cost
//! more a message than the cipher does on short ones.
//! Prints GB/s per crate, operation and size, best of five runs of at least
//! 200 ms each, and the ratio to RustCrypto. Run: `bench/crypto.sh`.

use std::hint::black_box;
use std::time::{Duration, Instant};

const KEY: [u8; 32] = [7; 32];

/// Runs `f` (which processes `bytes` per call) for >= 200 ms; best GB/s of five.
fn measure(bytes: usize, mut f: impl FnMut(u64)) -> f64 {
    let mut best: f64 = 0.0;
    for _ in 0..5 {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_millis(200) {
            for _ in 0..16 {
                f(n);
                n += 1;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        best = best.max(n as f64 * bytes as f64 / secs / 1e9);
    }
    best
}

fn nonce(n: u64) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[4..].copy_from_slice(&n.to_le_bytes());
    b
}

fn rustcrypto(len: usize) -> (f64, f64) {
    use chacha20poly1305::aead::AeadInPlace;
    use chacha20poly1305::{ChaCha20Poly1305, KeyInit};
    let c = ChaCha20Poly1305::new(&KEY.into());
    let mut buf = vec![0x5a; len];
    let seal = measure(len, |n| {
        let tag = c
            .encrypt_in_place_detached(&nonce(n).into(), &[], &mut buf)
            .unwrap();
        let _ = black_box(tag);
    });
    let tag = c
        .encrypt_in_place_detached(&nonce(0).into(), &[], &mut buf)
        .unwrap();
    let sealed = buf.clone();
    let open = measure(len, |_| {
        buf.copy_from_slice(&sealed);
        c.decrypt_in_place_detached(&nonce(0).into(), &[], &mut buf, &tag)
            .unwrap();
    });
    (seal, open)
}

/// ring and aws-lc-rs share one API (aws-lc-rs follows ring's): one body for both.
macro_rules! ring_like {
    ($name:ident, $krate:ident) => {
        fn $name(len: usize) -> (f64, f64) {
            use $krate::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
            let k = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &KEY).unwrap());
            let mut buf = vec![0x5a; len];
            let seal = measure(len, |n| {
                let tag = k
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce(n)),
                        Aad::empty(),
                        &mut buf,
                    )
                    .unwrap();
                let _ = black_box(tag);
            });
            let mut sealed = vec![0x5a; len];
            let tag = k
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce(0)),
                    Aad::empty(),
                    &mut sealed,
                )
                .unwrap();
            sealed.extend_from_slice(tag.as_ref());
            let mut work = sealed.clone();
            let open = measure(len, |_| {
                work.copy_from_slice(&sealed);
                k.open_in_place(
                    Nonce::assume_unique_for_key(nonce(0)),
                    Aad::empty(),
                    &mut work,
                )
                .unwrap();
            });
            (seal, open)
        }
    };
}

ring_like!(ring, ring);
ring_like!(aws_lc, aws_lc_rs);

/// OpenSSL 3's ChaCha20-Poly1305 through EVP, one context a direction kept
/// from message to message (only the nonce set anew), checked against ring.
fn ossl(len: usize) -> (f64, f64) {
    use openssl::cipher::Cipher;
    use openssl::cipher_ctx::CipherCtx;
    let mut e = CipherCtx::new().unwrap();
    e.encrypt_init(Some(Cipher::chacha20_poly1305()), Some(&KEY), None)
        .unwrap();
    let mut d = CipherCtx::new().unwrap();
    d.decrypt_init(Some(Cipher::chacha20_poly1305()), Some(&KEY), None)
        .unwrap();
    let mut buf = vec![0x5a; len];
    let mut scratch = [0u8; 16];
    let mut tag = [0u8; 16];
    let seal = measure(len, |n| {
        e.encrypt_init(None, None, Some(&nonce(n))).unwrap();
        e.cipher_update_inplace(&mut buf, len).unwrap();
        e.cipher_final(&mut scratch).unwrap();
        e.tag(&mut tag).unwrap();
        black_box(&tag);
    });
    let mut sealed = vec![0x5a; len];
    e.encrypt_init(None, None, Some(&nonce(0))).unwrap();
    e.cipher_update_inplace(&mut sealed, len).unwrap();
    e.cipher_final(&mut scratch).unwrap();
    e.tag(&mut tag).unwrap();
    {
        use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
        let k = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &KEY).unwrap());
        let mut r = vec![0x5a; len];
        let t = k
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce(0)),
                Aad::empty(),
                &mut r,
            )
            .unwrap();
        assert_eq!(r, sealed);
        assert_eq!(t.as_ref(), &tag);
    }
    let mut work = sealed.clone();
    let open = measure(len, |_| {
        work.copy_from_slice(&sealed);
        d.decrypt_init(None, None, Some(&nonce(0))).unwrap();
        d.set_tag(&tag).unwrap();
        d.cipher_update_inplace(&mut work, len).unwrap();
        d.cipher_final(&mut scratch).unwrap();
    });
    (seal, open)
}

fn main() {
    println!("ChaCha20-Poly1305 in place, GB/s (best of 5 x 200 ms), one core");
    println!("| size | crate | seal | open | seal vs RustCrypto | open vs RustCrypto |");
    println!("|---|---|---|---|---|---|");
    for len in [100usize, 1420, 65536] {
        let base = rustcrypto(len);
        for (name, (s, o)) in [
            ("RustCrypto chacha20poly1305 0.10", base),
            ("ring 0.17", ring(len)),
            ("aws-lc-rs 1", aws_lc(len)),
            ("openssl 3", ossl(len)),
        ] {
            println!(
                "| {len} | {name} | {s:.2} | {o:.2} | {:.2}x | {:.2}x |",
                s / base.0,
                o / base.1
            );
        }
    }
}
