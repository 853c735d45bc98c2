//! WireGuard (Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s), sans-IO.
//!
//! ```text
//!   keys       Curve25519 keys in wg's base64, zeroized on drop
//!   crypto     HASH, MAC, HMAC, KDF1..3, AEAD, TAI64N (whitepaper §5.4)
//!   messages   typed views of the four message types, offsets in `field`
//!   handshake  initiation/response creation and consumption, cookies (mac1/mac2)
//!   replay     the sliding window of received counters
//!   session    transport keys: seal/open data messages in place
//!   allowed    allowed IPs: longest-prefix match, updated in place
//!   tunnel     the interface: peers, sessions, timers, roaming, cookies, tap-mode switching
//! ```
//!
//! Randomness (ephemeral keys, indices) and time are parameters; nothing here
//! reads a clock, a socket or a global RNG.

pub mod allowed;
pub mod crypto;
pub mod handshake;
pub mod keys;
pub mod messages;
pub mod ratelimit;
pub mod replay;
pub mod session;
pub mod tunnel;
