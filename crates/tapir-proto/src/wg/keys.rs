//! Curve25519 keys in the base64 form `wg genkey`, `wg pubkey` and wg-quick use.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use x25519_dalek::{PublicKey as DalekPublic, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Why a key could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// Not base64, or not 32 bytes once decoded.
    Format,
    /// A public key of small order: Diffie-Hellman with it gives a secret
    /// that does not depend on our key, so anyone could act as that peer.
    LowOrder,
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Format => {
                "not a WireGuard key: expected 44 characters of base64 (32 bytes), as wg genkey prints"
            }
            Self::LowOrder => {
                "a key of small order (a degenerate Curve25519 point, not a real public key): anyone could impersonate such a peer; use the output of wg pubkey or tapir pubkey"
            }
        })
    }
}

/// The Curve25519 points of small order (and their non-canonical forms),
/// with the top bit cleared, as X25519 ignores it: libsodium's list.
#[rustfmt::skip]
const LOW_ORDER: [[u8; 32]; 7] = [
    // 0 (order 4)
    [0; 32],
    // 1 (order 1)
    [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    // order 8
    [0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4, 0x6a,
     0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49, 0xb8, 0x00],
    // order 8
    [0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef, 0x5b,
     0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f, 0x11, 0x57],
    // p - 1 (order 2)
    [0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
     0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
    // p (= 0)
    [0xed, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
     0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
    // p + 1 (= 1)
    [0xee, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
     0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
];

/// Whether `key` is a point of small order (in any encoding X25519 accepts).
pub fn is_low_order(key: &[u8; 32]) -> bool {
    let mut k = *key;
    k[31] &= 0x7f;
    LOW_ORDER.contains(&k)
}

impl std::error::Error for KeyError {}

/// 64 lower-case hex digits (the form of WireGuard's userspace API), in
/// one allocation of the final size: no piece of a key is left behind in
/// freed memory by a smaller string or a growing one (the caller wipes
/// the result).
fn hex32(bytes: &[u8; 32]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(64);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Reads 64 hex digits (the form of WireGuard's userspace API).
pub fn decode_hex32(text: &str) -> Result<[u8; 32], KeyError> {
    let mut out = [0u8; 32];
    decode_hex32_into(text, &mut out).map(|()| out)
}

/// [`decode_hex32`] into `out` (a private key's own place: no copy of it
/// is returned through the stack).
fn decode_hex32_into(text: &str, out: &mut [u8; 32]) -> Result<(), KeyError> {
    let text = text.trim().as_bytes();
    if text.len() != 64 {
        return Err(KeyError::Format);
    }
    for (i, pair) in text.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).map_err(|_| KeyError::Format)?;
        out[i] = u8::from_str_radix(s, 16).map_err(|_| KeyError::Format)?;
    }
    Ok(())
}

fn decode32(text: &str) -> Result<[u8; 32], KeyError> {
    let mut out = [0u8; 32];
    decode32_into(text, &mut out).map(|()| out)
}

/// [`decode32`] into `out` (as [`decode_hex32_into`]).
fn decode32_into(text: &str, out: &mut [u8; 32]) -> Result<(), KeyError> {
    let text = text.trim();
    // Decode into a buffer we can wipe: the text may be a private key.
    let mut buf = [0u8; 33];
    let n = STANDARD
        .decode_slice(text.as_bytes(), &mut buf)
        .map_err(|_| KeyError::Format)?;
    let ok = n == 32;
    out.copy_from_slice(&buf[..32]);
    buf.zeroize();
    if ok { Ok(()) } else { Err(KeyError::Format) }
}

/// A private key. Zeroized on drop; its `Debug` shows nothing of it.
///
/// Its bytes live in a box of their own: the configurations and tunnels
/// that hold a key move from function to function by value, and each move
/// of the bytes themselves would leave a copy in a stack frame that no
/// drop wipes (a running tunnel had 36 copies on its stacks; now the key
/// is copied only where it is used).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct PrivateKey(Box<[u8; 32]>);

impl PrivateKey {
    /// A key from 32 random bytes, clamped as `wg genkey` does.
    pub fn from_random(mut bytes: [u8; 32]) -> Self {
        let mut key = Self(Box::new(bytes));
        bytes.zeroize();
        key.0[0] &= 248;
        key.0[31] &= 127;
        key.0[31] |= 64;
        key
    }

    /// Reads the base64 form.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let mut key = Self(Box::new([0; 32]));
        decode32_into(text, &mut key.0).map(|()| key)
    }

    /// Reads the hex form of WireGuard's control socket.
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let mut key = Self(Box::new([0; 32]));
        decode_hex32_into(text, &mut key.0).map(|()| key)
    }

    /// The base64 form (for `tapir genkey` only: never log it).
    pub fn to_base64(&self) -> String {
        STANDARD.encode(&self.0[..])
    }

    /// Lower-case hex, for WireGuard's root-only control socket (`wg showconf`
    /// reads it there); never log it.
    pub fn to_hex(&self) -> String {
        hex32(&self.0)
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(DalekPublic::from(&self.secret()).to_bytes())
    }

    /// The key as x25519-dalek's secret, for Diffie-Hellman.
    pub(crate) fn secret(&self) -> StaticSecret {
        StaticSecret::from(*self.0)
    }
}

/// In constant time, and without a copy of either key in another form.
impl PartialEq for PrivateKey {
    fn eq(&self, other: &Self) -> bool {
        subtle::ConstantTimeEq::ct_eq(&self.0[..], &other.0[..]).into()
    }
}
impl Eq for PrivateKey {}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(<secret>)")
    }
}

/// A public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Reads the base64 form; refuses keys of small order.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        Self::from_bytes(decode32(text)?)
    }

    /// From raw bytes (the control socket's hex); refuses keys of small order.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, KeyError> {
        if is_low_order(&bytes) {
            return Err(KeyError::LowOrder);
        }
        Ok(Self(bytes))
    }

    /// The base64 form.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// The bytes, lower-case hex (the form of WireGuard's userspace API).
    pub fn to_hex(&self) -> String {
        hex32(&self.0)
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_base64())
    }
}

/// A preshared key (`wg genpsk`). Zeroized on drop; boxed as
/// [`PrivateKey`] is, so that the peers' configurations move without
/// copying it.
#[derive(Clone, Default, Zeroize, ZeroizeOnDrop)]
pub struct PresharedKey(pub(crate) Box<[u8; 32]>);

impl PresharedKey {
    /// From 32 random bytes.
    pub fn from_random(mut bytes: [u8; 32]) -> Self {
        let key = Self(Box::new(bytes));
        bytes.zeroize();
        key
    }

    /// Reads the base64 form.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let mut key = Self::default();
        decode32_into(text, &mut key.0).map(|()| key)
    }

    /// The base64 form (for `tapir genpsk` only).
    pub fn to_base64(&self) -> String {
        STANDARD.encode(&self.0[..])
    }

    /// Lower-case hex, for the root-only control socket.
    pub fn to_hex(&self) -> String {
        hex32(&self.0)
    }

    /// Whether it is all zeros (no preshared key).
    pub fn is_zero(&self) -> bool {
        *self.0 == [0; 32]
    }
}

/// In constant time, and without a copy of either key in another form.
impl PartialEq for PresharedKey {
    fn eq(&self, other: &Self) -> bool {
        subtle::ConstantTimeEq::ct_eq(&self.0[..], &other.0[..]).into()
    }
}
impl Eq for PresharedKey {}

impl std::fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PresharedKey(<secret>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pubkey_matches_wg() {
        // The private key of wg(8)'s example; the public key is what
        // `echo ... | wg pubkey` (wireguard-tools 1.0.20210914) printed.
        let private =
            PrivateKey::from_base64("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=").unwrap();
        assert_eq!(
            private.public_key().to_base64(),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
    }

    #[test]
    fn keys_of_small_order_are_refused_in_every_encoding() {
        for k in LOW_ORDER {
            let text = STANDARD.encode(k);
            assert_eq!(
                PublicKey::from_base64(&text),
                Err(KeyError::LowOrder),
                "{text}"
            );
            let mut high = k;
            high[31] |= 0x80;
            assert_eq!(PublicKey::from_bytes(high), Err(KeyError::LowOrder));
            // What X25519 makes of them: an all-zero secret, whatever our key.
            let shared = PrivateKey::from_random([9; 32])
                .secret()
                .diffie_hellman(&x25519_dalek::PublicKey::from(k));
            assert!(!shared.was_contributory());
        }
        assert!(KeyError::LowOrder.to_string().contains("impersonate"));
        let real = PrivateKey::from_random([3; 32]).public_key();
        assert_eq!(PublicKey::from_bytes(real.0), Ok(real));
    }

    #[test]
    fn no_private_key_has_a_public_key_of_small_order() {
        // Why `tapir pubkey` (as `wg pubkey`) needs no check of its input:
        // clamping makes the scalar a multiple of 8 with bit 254 set, so its
        // multiple of the base point is never of small order, whatever the
        // 32 bytes given (the odd ones included).
        let mut inputs = vec![[0u8; 32], [0xff; 32], [1; 32]];
        inputs.extend(LOW_ORDER);
        for b in inputs {
            let public = PrivateKey::from_random(b).public_key();
            assert_eq!(PublicKey::from_bytes(public.0), Ok(public), "{b:?}");
        }
    }

    #[test]
    fn bad_keys_and_secrets_not_shown() {
        assert_eq!(PublicKey::from_base64("abc"), Err(KeyError::Format));
        assert_eq!(
            PublicKey::from_base64(&"A".repeat(48)),
            Err(KeyError::Format)
        );
        assert!(PrivateKey::from_base64("!!!").is_err());
        let k = PrivateKey::from_random([0xff; 32]);
        assert_eq!(format!("{k:?}"), "PrivateKey(<secret>)");
        let text = k.to_base64();
        assert_eq!(PrivateKey::from_base64(&text).unwrap().to_base64(), text);
        assert_eq!(k.0[0] & 7, 0, "clamped");
        assert_eq!(k.0[31] & 0xc0, 0x40);
    }
}
