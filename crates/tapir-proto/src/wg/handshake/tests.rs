use super::*;
use std::time::Duration;

fn pair() -> (Identity, Identity, PeerStatic, PeerStatic) {
    let a = Identity::new(PrivateKey::from_random([1; 32]));
    let b = Identity::new(PrivateKey::from_random([2; 32]));
    let psk = PresharedKey::from_random([9; 32]);
    let a_knows_b = PeerStatic::new(&a, b.public(), Some(psk.clone()));
    let b_knows_a = PeerStatic::new(&b, a.public(), Some(psk));
    (a, b, a_knows_b, b_knows_a)
}

#[test]
fn both_sides_derive_the_same_keys() {
    let (a, b, a_b, b_a) = pair();
    let mut init = [0u8; INITIATION_LEN];
    let pending = write_initiation(
        &a,
        &a_b,
        0x1111,
        [3; 32],
        Duration::from_secs(1_700_000_000),
        None,
        &mut init,
    )
    .unwrap();
    // From a key that is no peer's: refused once it is decrypted.
    assert_eq!(
        read_initiation(&b, &init, |k| (*k != a.public()).then_some(&b_a)).err(),
        Some(HandshakeError::UnknownPeer)
    );
    let received = read_initiation(&b, &init, |k| (*k == a.public()).then_some(&b_a)).unwrap();
    assert_eq!(received.peer, a.public());
    assert_eq!(received.sender_index, 0x1111);
    assert_eq!(
        received.timestamp,
        crypto::tai64n(Duration::from_secs(1_700_000_000))
    );
    let mut resp = [0u8; RESPONSE_LEN];
    let b_keys = write_response(&b_a, &received, 0x2222, [4; 32], None, &mut resp).unwrap();
    let a_keys = read_response(&a, &a_b, &pending, &resp).unwrap();
    assert_eq!(a_keys.send, b_keys.recv);
    assert_eq!(a_keys.recv, b_keys.send);
    assert_ne!(a_keys.send, a_keys.recv);
    assert_eq!((a_keys.local_index, a_keys.remote_index), (0x1111, 0x2222));
    assert_eq!((b_keys.local_index, b_keys.remote_index), (0x2222, 0x1111));
    assert!(a_keys.initiator && !b_keys.initiator);
}

#[test]
fn forged_and_misdirected_messages_fail() {
    let (a, b, a_b, b_a) = pair();
    let mut init = [0u8; INITIATION_LEN];
    let pending = write_initiation(
        &a,
        &a_b,
        1,
        [3; 32],
        Duration::from_secs(5),
        None,
        &mut init,
    )
    .unwrap();
    // Every single-bit flip is refused (mac1 covers everything before it; mac2 is unchecked here).
    for byte in 0..field::INIT_MAC2.start {
        let mut bad = init;
        bad[byte] ^= 0x10;
        assert!(
            read_initiation(&b, &bad, |_| Some(&b_a)).is_err(),
            "flip in byte {byte}"
        );
    }
    // Sent to the wrong responder: mac1 fails.
    let c = Identity::new(PrivateKey::from_random([7; 32]));
    assert_eq!(
        read_initiation(&c, &init, |_| Some(&b_a)).err(),
        Some(HandshakeError::BadMac1)
    );
    assert_eq!(
        read_initiation(&b, &init[..100], |_| Some(&b_a)).err(),
        Some(HandshakeError::Malformed)
    );
    // A response with another psk: decryption fails.
    let received = read_initiation(&b, &init, |_| Some(&b_a)).unwrap();
    let wrong_psk = PeerStatic::new(&b, a.public(), Some(PresharedKey::from_random([8; 32])));
    let mut resp = [0u8; RESPONSE_LEN];
    write_response(&wrong_psk, &received, 2, [4; 32], None, &mut resp).unwrap();
    assert_eq!(
        read_response(&a, &a_b, &pending, &resp).err(),
        Some(HandshakeError::Decrypt)
    );
    // A response to another initiation.
    write_response(&b_a, &received, 2, [4; 32], None, &mut resp).unwrap();
    let mut other = resp;
    other[field::RESP_RECEIVER].copy_from_slice(&99u32.to_le_bytes());
    let m1 = mac(&a.mac1_key, &[&other[..field::RESP_MAC1.start]]);
    other[field::RESP_MAC1].copy_from_slice(&m1);
    assert_eq!(
        read_response(&a, &a_b, &pending, &other).err(),
        Some(HandshakeError::UnexpectedResponse)
    );
    assert!(read_response(&a, &a_b, &pending, &resp).is_ok());
}

#[test]
fn cookies_round_trip_and_bind_mac2() {
    let (a, b, a_b, b_a) = pair();
    let mut init = [0u8; INITIATION_LEN];
    let pending = write_initiation(
        &a,
        &a_b,
        1,
        [3; 32],
        Duration::from_secs(5),
        None,
        &mut init,
    )
    .unwrap();
    // b is under load: it answers with a cookie for a's address.
    let cookie = cookie_for(&[5; 32], b"10.0.0.1:51820");
    let mut reply = [0u8; messages::COOKIE_LEN];
    write_cookie_reply(&b, &init, &cookie, [6; 24], &mut reply).unwrap();
    assert_eq!(messages::read_u32(&reply, field::COOKIE_RECEIVER), 1);
    let got = read_cookie_reply(&a_b, &pending.mac1, &reply).unwrap();
    assert_eq!(got, cookie);
    assert!(
        read_cookie_reply(&a_b, &[0; 16], &reply).is_err(),
        "bound to the mac1 it answers"
    );
    // The next initiation carries mac2, which b can check.
    assert_eq!(
        verify_mac2(&cookie, &init).err(),
        Some(HandshakeError::BadMac2)
    );
    let mut again = [0u8; INITIATION_LEN];
    write_initiation(
        &a,
        &a_b,
        2,
        [3; 32],
        Duration::from_secs(6),
        Some(&got),
        &mut again,
    )
    .unwrap();
    assert!(verify_mac2(&cookie, &again).is_ok());
    assert!(read_initiation(&b, &again, |_| Some(&b_a)).is_ok());
    let _ = b_a;
}

#[test]
fn low_order_ephemeral_is_refused() {
    let (a, b, a_b, _) = pair();
    let mut init = [0u8; INITIATION_LEN];
    write_initiation(
        &a,
        &a_b,
        1,
        [3; 32],
        Duration::from_secs(5),
        None,
        &mut init,
    )
    .unwrap();
    // Replace the ephemeral by the identity point and fix mac1: DH gives zero.
    init[field::INIT_EPHEMERAL].fill(0);
    init[field::INIT_EPHEMERAL.start] = 1;
    let m1 = mac(&b.mac1_key, &[&init[..field::INIT_MAC1.start]]);
    init[field::INIT_MAC1].copy_from_slice(&m1);
    assert_eq!(
        read_initiation(&b, &init, |_| None).err(),
        Some(HandshakeError::WeakKey)
    );
}
