//! The Noise_IKpsk2 handshake of WireGuard (whitepaper §5.4.2–5.4.4) and its
//! cookie mechanism (§5.4.7), as functions over caller-owned message buffers.
//!
//! ```text
//!   initiator                                  responder
//!   write_initiation(eph, now) ──initiation──▶ read_initiation → (peer, timestamp)
//!                                              write_response(eph) → TransportKeys
//!   read_response ◀──────────response──────────
//!     → TransportKeys
//! ```
//! Ephemeral keys and indices come from the caller's randomness; MAC
//! comparisons are constant-time; every secret is zeroized on drop.

use subtle::ConstantTimeEq;
use x25519_dalek::{PublicKey as DalekPublic, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::crypto::{self, LABEL_COOKIE, LABEL_MAC1, TAG_LEN, hash, kdf, mac};
use super::keys::{PresharedKey, PrivateKey, PublicKey};
use super::messages::{self, INITIATION_LEN, RESPONSE_LEN, field};

/// Why a handshake message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeError {
    /// Wrong length or type.
    Malformed,
    /// mac1 does not verify: not for us, or forged.
    BadMac1,
    /// mac2 missing or wrong while we are under load.
    BadMac2,
    /// Decryption failed: wrong keys or tampered.
    Decrypt,
    /// The static key is not one of our peers.
    UnknownPeer,
    /// A response to no initiation of ours, or to an old one.
    UnexpectedResponse,
    /// A Diffie-Hellman result of zero (a low-order point).
    WeakKey,
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Malformed => "malformed handshake message",
            Self::BadMac1 => "mac1 does not verify",
            Self::BadMac2 => "mac2 missing or wrong under load",
            Self::Decrypt => "handshake decryption failed",
            Self::UnknownPeer => "initiation from an unknown public key",
            Self::UnexpectedResponse => "response to no pending initiation",
            Self::WeakKey => "low-order public key",
        })
    }
}

impl std::error::Error for HandshakeError {}

/// Our side: the static key pair and the keys derived from its public half.
#[derive(Clone)]
pub struct Identity {
    private: PrivateKey,
    public: PublicKey,
    /// `HASH(LABEL_MAC1 || our public)`: the key of mac1 on messages to us.
    mac1_key: [u8; 32],
    /// `HASH(LABEL_COOKIE || our public)`: encrypts cookies we send.
    cookie_key: [u8; 32],
}

impl Identity {
    /// From our private key.
    pub fn new(private: PrivateKey) -> Self {
        let public = private.public_key();
        Self {
            mac1_key: hash(&[LABEL_MAC1, &public.0]),
            cookie_key: hash(&[LABEL_COOKIE, &public.0]),
            private,
            public,
        }
    }

    /// Our public key.
    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// Our private key.
    pub fn private(&self) -> &PrivateKey {
        &self.private
    }
}

/// What we know of a peer for the handshake.
#[derive(Clone)]
pub struct PeerStatic {
    /// Its public key.
    pub public: PublicKey,
    /// The preshared key (all zeros when none).
    pub psk: PresharedKey,
    /// `HASH(LABEL_MAC1 || its public)`.
    mac1_key: [u8; 32],
    /// `HASH(LABEL_COOKIE || its public)`: decrypts cookies it sends.
    cookie_key: [u8; 32],
    /// `DH(our static, its static)`, computed at the first initiation (a
    /// Diffie-Hellman is ~40 µs: 10,000 peers would cost 0.4 s at start);
    /// `None` if it is all zeros (a key of small order): no handshake with
    /// this peer, either way.
    static_static: std::cell::OnceCell<Option<[u8; 32]>>,
}

impl Drop for PeerStatic {
    fn drop(&mut self) {
        // In place: `take` would wipe a copy and leave the cell's bytes.
        if let Some(Some(k)) = self.static_static.get_mut() {
            k.zeroize();
        }
    }
}

impl PeerStatic {
    /// Prepares a peer of `id`.
    pub fn new(id: &Identity, public: PublicKey, psk: Option<PresharedKey>) -> Self {
        let _ = id;
        Self {
            mac1_key: hash(&[LABEL_MAC1, &public.0]),
            cookie_key: hash(&[LABEL_COOKIE, &public.0]),
            static_static: std::cell::OnceCell::new(),
            psk: psk.unwrap_or_default(),
            public,
        }
    }

    /// `DH(our static, its static)`, computed once; a weak key is refused.
    fn static_static(&self, id: &Identity) -> Result<Zeroizing<[u8; 32]>, HandshakeError> {
        let ss = self.static_static.get_or_init(|| {
            let ss = id
                .private
                .secret()
                .diffie_hellman(&DalekPublic::from(self.public.0));
            ss.was_contributory().then(|| ss.to_bytes())
        });
        ss.map(Zeroizing::new).ok_or(HandshakeError::WeakKey)
    }
}

/// Keys of one transport session.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct TransportKeys {
    /// Our index: the receiver index of data sent to us.
    #[zeroize(skip)]
    pub local_index: u32,
    /// The peer's index: the receiver index of data we send.
    #[zeroize(skip)]
    pub remote_index: u32,
    /// Encrypts what we send.
    pub send: [u8; 32],
    /// Decrypts what we receive.
    pub recv: [u8; 32],
    /// Whether we initiated (the initiator may send at once; the responder
    /// waits for the first data message, §5.4.4).
    #[zeroize(skip)]
    pub initiator: bool,
}

/// An initiation we sent and await the response to.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct PendingInitiation {
    /// Our index in it.
    #[zeroize(skip)]
    pub local_index: u32,
    chaining: [u8; 32],
    hash: [u8; 32],
    ephemeral: [u8; 32],
    /// The mac1 we sent, the associated data of a cookie reply to it.
    #[zeroize(skip)]
    pub mac1: [u8; 16],
}

/// An initiation we received and authenticated.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct ReceivedInitiation {
    /// The initiator's static key (look the peer up by it).
    #[zeroize(skip)]
    pub peer: PublicKey,
    /// The initiator's index.
    #[zeroize(skip)]
    pub sender_index: u32,
    /// TAI64N timestamp: must exceed the last one seen from this peer.
    #[zeroize(skip)]
    pub timestamp: [u8; 12],
    chaining: [u8; 32],
    hash: [u8; 32],
    remote_ephemeral: [u8; 32],
}

fn initial() -> ([u8; 32], [u8; 32]) {
    let chaining = hash(&[crypto::CONSTRUCTION]);
    let h = hash(&[&chaining, crypto::IDENTIFIER]);
    (chaining, h)
}

/// `DH(secret, public)`, wiped when dropped; an all-zero result (a key of
/// small order) is refused.
fn dh(secret: &[u8; 32], public: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>, HandshakeError> {
    let shared = StaticSecret::from(*secret).diffie_hellman(&DalekPublic::from(*public));
    if !shared.was_contributory() {
        return Err(HandshakeError::WeakKey);
    }
    Ok(Zeroizing::new(shared.to_bytes()))
}

fn public_of(secret: &[u8; 32]) -> [u8; 32] {
    DalekPublic::from(&StaticSecret::from(*secret)).to_bytes()
}

/// Checks mac1 of an initiation or a response addressed to `id`.
pub fn verify_mac1(id: &Identity, msg: &[u8]) -> Result<(), HandshakeError> {
    let at = match msg.len() {
        INITIATION_LEN => field::INIT_MAC1.start,
        RESPONSE_LEN => field::RESP_MAC1.start,
        _ => return Err(HandshakeError::Malformed),
    };
    let expected = mac(&id.mac1_key, &[&msg[..at]]);
    if bool::from(expected.ct_eq(&msg[at..at + 16])) {
        Ok(())
    } else {
        Err(HandshakeError::BadMac1)
    }
}

/// Checks mac2 against the cookie we would give `source` (bytes of its address).
pub fn verify_mac2(cookie: &[u8; 16], msg: &[u8]) -> Result<(), HandshakeError> {
    let at = match msg.len() {
        INITIATION_LEN => field::INIT_MAC2.start,
        RESPONSE_LEN => field::RESP_MAC2.start,
        _ => return Err(HandshakeError::Malformed),
    };
    let expected = mac(cookie, &[&msg[..at]]);
    if bool::from(expected.ct_eq(&msg[at..at + 16])) {
        Ok(())
    } else {
        Err(HandshakeError::BadMac2)
    }
}

fn write_macs(msg: &mut [u8], mac1_key: &[u8; 32], cookie: Option<&[u8; 16]>) -> [u8; 16] {
    let at = msg.len() - 32;
    let m1 = mac(mac1_key, &[&msg[..at]]);
    msg[at..at + 16].copy_from_slice(&m1);
    let m2 = cookie.map_or([0u8; 16], |c| mac(c, &[&msg[..at + 16]]));
    msg[at + 16..at + 32].copy_from_slice(&m2);
    m1
}

/// Writes an initiation to `peer` into `out`.
///
/// `ephemeral` is 32 random bytes, `now` the wall-clock time since the Unix
/// epoch (its TAI64N form protects against replayed initiations), `cookie`
/// the last cookie the peer sent us, if still fresh.
pub fn write_initiation(
    id: &Identity,
    peer: &PeerStatic,
    local_index: u32,
    ephemeral: [u8; 32],
    now: std::time::Duration,
    cookie: Option<&[u8; 16]>,
    out: &mut [u8; INITIATION_LEN],
) -> Result<PendingInitiation, HandshakeError> {
    let static_static = peer.static_static(id)?;
    let (mut c, mut h) = initial();
    h = hash(&[&h, &peer.public.0]);
    let e_pub = public_of(&ephemeral);
    [c] = kdf::<1>(&c, &e_pub);
    messages::write_type(out, messages::TYPE_INITIATION);
    out[field::INIT_SENDER].copy_from_slice(&local_index.to_le_bytes());
    out[field::INIT_EPHEMERAL].copy_from_slice(&e_pub);
    h = hash(&[&h, &e_pub]);
    // Never initiate on an all-zero secret (a key of small order).
    let es = dh(&ephemeral, &peer.public.0)?;
    let [c2, k] = kdf::<2>(&c, &*es);
    c = c2;
    let st = &mut out[field::INIT_STATIC];
    st[..32].copy_from_slice(&id.public.0);
    crypto::seal(&k, 0, &h, st, 32);
    h = hash(&[&h, &out[field::INIT_STATIC]]);
    let [c3, k] = kdf::<2>(&c, &*static_static);
    c = c3;
    let ts = &mut out[field::INIT_TIMESTAMP];
    ts[..12].copy_from_slice(&crypto::tai64n(now));
    crypto::seal(&k, 0, &h, ts, 12);
    h = hash(&[&h, &out[field::INIT_TIMESTAMP]]);
    let mac1 = write_macs(out, &peer.mac1_key, cookie);
    let mut k = k;
    k.zeroize();
    Ok(PendingInitiation {
        local_index,
        chaining: c,
        hash: h,
        ephemeral,
        mac1,
    })
}

/// Authenticates an initiation sent to `id`. mac1 is checked here; mac2 (under
/// load) is the caller's business. `peer_of` finds the sender's key among
/// the peers, as soon as it is decrypted: an unknown one costs no second
/// Diffie-Hellman, and a known one's static-static is its kept one. The
/// caller then checks the timestamp.
pub fn read_initiation<'p>(
    id: &Identity,
    msg: &[u8],
    peer_of: impl FnOnce(&PublicKey) -> Option<&'p PeerStatic>,
) -> Result<ReceivedInitiation, HandshakeError> {
    if messages::kind(msg) != Some(messages::Kind::Initiation) {
        return Err(HandshakeError::Malformed);
    }
    verify_mac1(id, msg)?;
    let (mut c, mut h) = initial();
    h = hash(&[&h, &id.public.0]);
    let mut e_pub = [0u8; 32];
    e_pub.copy_from_slice(&msg[field::INIT_EPHEMERAL]);
    [c] = kdf::<1>(&c, &e_pub);
    h = hash(&[&h, &e_pub]);
    let our_secret = Zeroizing::new(id.private.secret().to_bytes());
    let es = dh(&our_secret, &e_pub)?;
    let [c2, k] = kdf::<2>(&c, &*es);
    // Wiped on every way out, the failed ones too.
    let k = Zeroizing::new(k);
    c = c2;
    let mut st = [0u8; 48];
    st.copy_from_slice(&msg[field::INIT_STATIC]);
    if !crypto::open(&k, 0, &h, &mut st) {
        return Err(HandshakeError::Decrypt);
    }
    let mut peer = [0u8; 32];
    peer.copy_from_slice(&st[..32]);
    h = hash(&[&h, &msg[field::INIT_STATIC]]);
    let ss = peer_of(&PublicKey(peer))
        .ok_or(HandshakeError::UnknownPeer)?
        .static_static(id)?;
    let [c3, k] = kdf::<2>(&c, &*ss);
    let k = Zeroizing::new(k);
    c = c3;
    let mut ts = [0u8; 28];
    ts.copy_from_slice(&msg[field::INIT_TIMESTAMP]);
    if !crypto::open(&k, 0, &h, &mut ts) {
        return Err(HandshakeError::Decrypt);
    }
    h = hash(&[&h, &msg[field::INIT_TIMESTAMP]]);
    let mut timestamp = [0u8; 12];
    timestamp.copy_from_slice(&ts[..12]);
    Ok(ReceivedInitiation {
        peer: PublicKey(peer),
        sender_index: messages::read_u32(msg, field::INIT_SENDER),
        timestamp,
        chaining: c,
        hash: h,
        remote_ephemeral: e_pub,
    })
}

/// Writes the response to an authenticated initiation from `peer`, and
/// returns the session's keys (usable for receiving at once, for sending once
/// the initiator's first data message arrived).
pub fn write_response(
    peer: &PeerStatic,
    init: &ReceivedInitiation,
    local_index: u32,
    ephemeral: [u8; 32],
    cookie: Option<&[u8; 16]>,
    out: &mut [u8; RESPONSE_LEN],
) -> Result<TransportKeys, HandshakeError> {
    let ephemeral = Zeroizing::new(ephemeral);
    let (mut c, mut h) = (init.chaining, init.hash);
    let e_pub = public_of(&ephemeral);
    [c] = kdf::<1>(&c, &e_pub);
    messages::write_type(out, messages::TYPE_RESPONSE);
    out[field::RESP_SENDER].copy_from_slice(&local_index.to_le_bytes());
    out[field::RESP_RECEIVER].copy_from_slice(&init.sender_index.to_le_bytes());
    out[field::RESP_EPHEMERAL].copy_from_slice(&e_pub);
    h = hash(&[&h, &e_pub]);
    [c] = kdf::<1>(&c, &*dh(&ephemeral, &init.remote_ephemeral)?);
    [c] = kdf::<1>(&c, &*dh(&ephemeral, &peer.public.0)?);
    let [c2, tau, k] = kdf::<3>(&c, &*peer.psk.0);
    c = c2;
    h = hash(&[&h, &tau]);
    let empty = &mut out[field::RESP_EMPTY];
    crypto::seal(&k, 0, &h, empty, 0);
    write_macs(out, &peer.mac1_key, cookie);
    let [recv, send] = kdf::<2>(&c, &[]);
    let (mut c, mut k) = (c, k);
    c.zeroize();
    k.zeroize();
    Ok(TransportKeys {
        local_index,
        remote_index: init.sender_index,
        send,
        recv,
        initiator: false,
    })
}

/// Reads the response to our pending initiation from `peer` (mac1 checked here).
pub fn read_response(
    id: &Identity,
    peer: &PeerStatic,
    pending: &PendingInitiation,
    msg: &[u8],
) -> Result<TransportKeys, HandshakeError> {
    if messages::kind(msg) != Some(messages::Kind::Response) {
        return Err(HandshakeError::Malformed);
    }
    verify_mac1(id, msg)?;
    if messages::read_u32(msg, field::RESP_RECEIVER) != pending.local_index {
        return Err(HandshakeError::UnexpectedResponse);
    }
    let (mut c, mut h) = (pending.chaining, pending.hash);
    let mut e_pub = [0u8; 32];
    e_pub.copy_from_slice(&msg[field::RESP_EPHEMERAL]);
    [c] = kdf::<1>(&c, &e_pub);
    h = hash(&[&h, &e_pub]);
    [c] = kdf::<1>(&c, &*dh(&pending.ephemeral, &e_pub)?);
    let our_secret = Zeroizing::new(id.private.secret().to_bytes());
    [c] = kdf::<1>(&c, &*dh(&our_secret, &e_pub)?);
    let [c2, tau, k] = kdf::<3>(&c, &*peer.psk.0);
    let k = Zeroizing::new(k);
    c = c2;
    h = hash(&[&h, &tau]);
    let mut empty = [0u8; TAG_LEN];
    empty.copy_from_slice(&msg[field::RESP_EMPTY]);
    if !crypto::open(&k, 0, &h, &mut empty) {
        return Err(HandshakeError::Decrypt);
    }
    let [send, recv] = kdf::<2>(&c, &[]);
    c.zeroize();
    Ok(TransportKeys {
        local_index: pending.local_index,
        remote_index: messages::read_u32(msg, field::RESP_SENDER),
        send,
        recv,
        initiator: true,
    })
}

/// The cookie a responder under load gives a source: `MAC(secret, source)`,
/// where `secret` changes every two minutes and `source` is the sender's
/// address and port as bytes.
pub fn cookie_for(secret: &[u8; 32], source: &[u8]) -> [u8; 16] {
    mac(secret, &[source])
}

/// Writes a cookie reply to `msg` (an initiation or response we will not
/// process under load): the cookie, sealed for its sender. `nonce` is 24
/// random bytes.
pub fn write_cookie_reply(
    id: &Identity,
    msg: &[u8],
    cookie: &[u8; 16],
    nonce: [u8; 24],
    out: &mut [u8; messages::COOKIE_LEN],
) -> Result<(), HandshakeError> {
    let (receiver, mac1) = match msg.len() {
        INITIATION_LEN => (
            messages::read_u32(msg, field::INIT_SENDER),
            &msg[field::INIT_MAC1],
        ),
        RESPONSE_LEN => (
            messages::read_u32(msg, field::RESP_SENDER),
            &msg[field::RESP_MAC1],
        ),
        _ => return Err(HandshakeError::Malformed),
    };
    messages::write_type(out, messages::TYPE_COOKIE);
    out[field::COOKIE_RECEIVER].copy_from_slice(&receiver.to_le_bytes());
    out[field::COOKIE_NONCE].copy_from_slice(&nonce);
    let sealed = crypto::xseal(&id.cookie_key, &nonce, mac1, cookie);
    out[field::COOKIE_SEALED].copy_from_slice(&sealed);
    Ok(())
}

/// Opens a cookie reply from `peer` to a message of ours whose mac1 was `mac1`.
pub fn read_cookie_reply(
    peer: &PeerStatic,
    mac1: &[u8; 16],
    msg: &[u8],
) -> Result<[u8; 16], HandshakeError> {
    if messages::kind(msg) != Some(messages::Kind::Cookie) {
        return Err(HandshakeError::Malformed);
    }
    let mut nonce = [0u8; 24];
    nonce.copy_from_slice(&msg[field::COOKIE_NONCE]);
    let mut sealed = [0u8; 32];
    sealed.copy_from_slice(&msg[field::COOKIE_SEALED]);
    crypto::xopen(&peer.cookie_key, &nonce, mac1, &sealed).ok_or(HandshakeError::Decrypt)
}

#[cfg(test)]
mod tests;
